// The GPU backings on a real device: committed memory is usable from a kernel, decommit gives
// device memory back, a commit that cannot be satisfied rolls back, nothing is left behind.
#define VMMPP_GPU_TEST_NAME "gpu backings"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <boost/mpl/list.hpp>

#include <dlfcn.h>

#include <vector>

#include "vmmpp/backing/device.hpp"
#include "vmmpp/backing/managed_prefetch.hpp"
#include "vmmpp/backing/vmm.hpp"

using namespace vmmpp_test;

namespace {

__global__ void fill(unsigned* p, std::size_t n, unsigned seed) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        p[i] = seed ^ static_cast<unsigned>(i * 2654435761u);
    }
}

__global__ void count_mismatches(const unsigned* p, std::size_t n, unsigned seed, unsigned long long* bad) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        if (p[i] != (seed ^ static_cast<unsigned>(i * 2654435761u))) {
            atomicAdd(bad, 1ull);
        }
    }
}

/// Writes a pattern over [p, p+bytes) with one kernel and counts mismatches with another.
unsigned long long write_and_verify(std::byte* p, std::size_t bytes, unsigned seed) {
    auto* words = reinterpret_cast<unsigned*>(p);
    const std::size_t n = bytes / sizeof(unsigned);
    unsigned long long* bad = nullptr;
    cuda_check(cudaMalloc(&bad, sizeof *bad));
    cuda_check(cudaMemset(bad, 0, sizeof *bad));
    fill<<<256, 256>>>(words, n, seed);
    count_mismatches<<<256, 256>>>(words, n, seed, bad);
    cuda_check(cudaGetLastError());
    unsigned long long result = 0;
    cuda_check(cudaMemcpy(&result, bad, sizeof result, cudaMemcpyDeviceToHost));
    cuda_check(cudaFree(bad));
    return result;
}

using gpu_backings = boost::mpl::list<vmmpp::vmm, vmmpp::device, vmmpp::managed_prefetch<>>;

} // namespace

BOOST_AUTO_TEST_SUITE(gpu_backing_suite, *boost::unit_test::precondition(needs_gpu{}))

BOOST_AUTO_TEST_CASE_TEMPLATE(committed_memory_is_usable_from_kernels, B, gpu_backings) {
    cuda_check(cudaSetDevice(0));
    {
        // Warm-up: the driver's one-time structures (managed memory's especially) are not ours.
        B warm(2 * MiB, {});
        warm.commit(0, 2 * MiB);
        (void)write_and_verify(warm.base(), 2 * MiB, 1u);
    }
    cuda_check(cudaDeviceSynchronize());
    const std::size_t before = free_device_bytes();
    {
        B b(64 * MiB, {});
        BOOST_TEST(b.granularity() == 2 * MiB);
        b.commit(8 * MiB, 16 * MiB);
        BOOST_TEST(b.committed_bytes() == 16 * MiB);
        BOOST_TEST(write_and_verify(b.base() + 8 * MiB, 16 * MiB, 0x1234u) == 0u);
        b.commit(0, 2 * MiB);
        BOOST_TEST(write_and_verify(b.base(), 2 * MiB, 0x99u) == 0u);
        b.decommit(8 * MiB, 16 * MiB);
        BOOST_TEST(b.committed_bytes() == 2 * MiB);
        BOOST_CHECK_THROW(b.decommit(8 * MiB, 2 * MiB), vmmpp::invalid_argument);
        BOOST_CHECK_THROW(b.commit(1 * MiB, 2 * MiB), vmmpp::invalid_argument);
    }
    cuda_check(cudaDeviceSynchronize());
    const std::size_t after = free_device_bytes();
    // Nothing of the backing is left on the device (a few MiB of slack for driver bookkeeping).
    BOOST_TEST(after + 4 * MiB >= before, "free before " << before << ", after " << after);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(vmm_suite, *boost::unit_test::precondition(needs_gpu{}))

BOOST_AUTO_TEST_CASE(decommit_returns_device_memory) {
    cuda_check(cudaSetDevice(0));
    cuda_check(cudaFree(nullptr));
    vmmpp::vmm b(4 * GiB);
    BOOST_TEST(vmmpp::is_vmm_supported(0));
    const std::size_t start = free_device_bytes();
    b.commit(0, GiB);  // one 1 GiB handle
    BOOST_TEST(b.handle_count() == 1u);
    const std::size_t grown = free_device_bytes();
    BOOST_TEST(start - grown >= GiB, "free " << start << " -> " << grown);
    BOOST_TEST(write_and_verify(b.base(), GiB, 7u) == 0u);
    // A decommit that would split the handle is refused and changes nothing.
    BOOST_CHECK_THROW(b.decommit(0, 512 * MiB), vmmpp::invalid_argument);
    BOOST_TEST(b.committed_bytes() == GiB);
    b.decommit(0, GiB);
    const std::size_t back = free_device_bytes();
    BOOST_TEST(back + 4 * MiB >= start, "free after decommit " << back << ", at start " << start);
    BOOST_TEST(b.handle_count() == 0u);
}

// vmm_options::gpu_direct_rdma: the driver reports committed pages GPUDirect RDMA capable only
// when asked (what UCX checks before registering them with an RDMA NIC, docs/NIXL.md).
BOOST_AUTO_TEST_CASE(gpu_direct_rdma_pages_say_so) {
    cuda_check(cudaSetDevice(0));
    if (!vmmpp::supports_gpu_direct_rdma_with_vmm(0)) {
        BOOST_CHECK_THROW(vmmpp::vmm(4 * MiB, {.gpu_direct_rdma = true}), vmmpp::invalid_argument);
        return;
    }
    using pointer_attribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
    void* libcuda = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    BOOST_TEST_REQUIRE(libcuda != nullptr);
    const auto get = reinterpret_cast<pointer_attribute>(::dlsym(libcuda, "cuPointerGetAttribute"));
    BOOST_TEST_REQUIRE(get != nullptr);
    for (const bool rdma : {false, true}) {
        vmmpp::vmm b(64 * MiB, {.gpu_direct_rdma = rdma});
        b.commit(0, 4 * MiB);
        int capable = -1;
        BOOST_TEST(get(&capable, CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE,
                       reinterpret_cast<CUdeviceptr>(b.base())) == CUDA_SUCCESS);
        BOOST_TEST(capable == (rdma ? 1 : 0), "gpu_direct_rdma " << rdma);
        BOOST_TEST(write_and_verify(b.base(), 4 * MiB, 3u) == 0u);
    }
    ::dlclose(libcuda);
}

BOOST_AUTO_TEST_CASE(fixed_handle_size_splits_commits) {
    vmmpp::vmm b(64 * MiB, {.device = 0, .handle_bytes = 4 * MiB});
    b.commit(0, 16 * MiB);
    BOOST_TEST(b.handle_count() == 4u);
    b.decommit(4 * MiB, 4 * MiB);  // one handle out of the middle
    BOOST_TEST(b.handle_count() == 3u);
    BOOST_TEST(write_and_verify(b.base() + 8 * MiB, 8 * MiB, 3u) == 0u);
    BOOST_CHECK_THROW(b.commit(4 * MiB, 2 * MiB), vmmpp::invalid_argument);  // half a handle
    BOOST_CHECK_THROW(vmmpp::vmm(64 * MiB, {.device = 0, .handle_bytes = 3 * MiB}), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(a_commit_that_cannot_be_satisfied_rolls_back) {
    cuda_check(cudaSetDevice(0));
    std::size_t free = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free, &total));
    // Reserve more than the device has; commit it in 1 GiB handles until the device runs out.
    const std::size_t capacity = (total / GiB + 2) * GiB;
    vmmpp::vmm b(capacity, {.device = 0, .handle_bytes = GiB});
    b.commit(0, GiB);
    const std::size_t before = free_device_bytes();
    try {
        b.commit(GiB, capacity - GiB);
        BOOST_ERROR("committing more than the device holds succeeded");
    } catch (const vmmpp::out_of_memory& e) {
        BOOST_TEST_MESSAGE(e.what());
        BOOST_TEST(e.requested() == capacity - GiB);
    }
    BOOST_TEST(b.committed_bytes() == GiB);
    BOOST_TEST(b.handle_count() == 1u);
    const std::size_t after = free_device_bytes();
    BOOST_TEST(after + 4 * MiB >= before, "free before " << before << ", after rollback " << after);
    // The backing still works after the failure.
    b.commit(GiB, GiB);
    BOOST_TEST(write_and_verify(b.base(), 2 * GiB, 11u) == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(managed_suite, *boost::unit_test::precondition(needs_gpu{}))

BOOST_AUTO_TEST_CASE(capacity_above_free_memory_is_refused_on_a_non_coherent_device) {
    int coherent = 0;
    cuda_check(cudaDeviceGetAttribute(&coherent, cudaDevAttrPageableMemoryAccessUsesHostPageTables, 0));
    if (coherent != 0) {
        BOOST_TEST_MESSAGE("device is coherent with the CPU: large managed capacities are allowed");
        return;
    }
    std::size_t free = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free, &total));
    try {
        vmmpp::managed_prefetch<> m(((total / GiB) + 1) * GiB);
        BOOST_ERROR("managed capacity above free device memory was accepted");
    } catch (const vmmpp::out_of_memory& e) {
        BOOST_TEST(std::string(e.what()).find("not coherent") != std::string::npos, e.what());
    }
}

// Known gap, measured on an H100 (2026-11-23, bench/results/nvidia-h100-80gb-hbm3-2026-11-23/
// gpu_tests.log): prefetching the range back to the CPU did not raise cudaMemGetInfo's free
// memory, and tools/probes/managed_release.cu found no call short of cudaFree that does
// (bench/results/gpu-tests-nvidia-h100-2026-11-23/probe.log). The one failing check (memory back
// after decommit) is expected; Boost reports it if the count changes.
BOOST_AUTO_TEST_CASE(commit_prefetches_and_decommit_moves_off_the_device, *boost::unit_test::expected_failures(1)) {
    cuda_check(cudaSetDevice(0));
    // Large enough to see past the driver's own managed-memory reserve (about 110 MiB on an H100),
    // far below the device's free memory.
    vmmpp::managed_prefetch<> m(1 * GiB);
    const std::size_t start = free_device_bytes();
    m.commit(0, 512 * MiB);
    BOOST_TEST(write_and_verify(m.base(), 512 * MiB, 5u) == 0u);
    const std::size_t grown = free_device_bytes();
    BOOST_TEST(start - grown >= 400 * MiB, "free " << start << " -> " << grown);
    // Host-accessible: the CPU reads what the kernel wrote.
    BOOST_TEST(reinterpret_cast<unsigned*>(m.base())[0] == 5u);
    m.decommit(0, 512 * MiB);
    const std::size_t back = free_device_bytes();
    BOOST_TEST(back + 4 * MiB >= start, "free " << back << " after decommit, " << start << " at start");
}

BOOST_AUTO_TEST_SUITE_END()
