// vmmpp::pool_memory_resource (vmmpp/interop/cuda_mr.hpp) on the GPU: kernels write and read
// what CCCL's resource_ref hands out from an elastic (vmm), a managed and a static pool, and a
// deallocate_async behind a kernel still reading the memory neither unmaps it under the kernel nor
// hands its range out before the kernel is done.
#define VMMPP_GPU_TEST_NAME "gpu cuda_mr resource"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <boost/mpl/list.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/interop/cuda_mr.hpp"

using namespace vmmpp_test;

namespace {

__global__ void fill(unsigned char* p, std::size_t bytes, unsigned char value) {
    for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < bytes; i += std::size_t{gridDim.x} * blockDim.x) {
        p[i] = value;
    }
}

/// Spins for `cycles` clock cycles (work still queued when the memory is freed), then counts
/// the bytes of [p, p+bytes) that are not `value` into *bad.
__global__ void spin_then_count(const unsigned char* p, std::size_t bytes, unsigned char value, long long cycles,
                                unsigned long long* bad) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
    unsigned long long local = 0;
    for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < bytes; i += std::size_t{gridDim.x} * blockDim.x) {
        local += p[i] != value;
    }
    atomicAdd(bad, local);
}

long long spin_cycles() {  // about 300 ms at the device's clock
    int khz = 0;
    cuda_check(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    return static_cast<long long>(khz) * 300;
}

template <class Config>
struct made_pool {
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<vmmpp::elastic_pool<Config>> pool;
    explicit made_pool(std::size_t capacity) {
        if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
            budget = std::make_unique<vmmpp::budget>(capacity);
            pool = std::make_unique<vmmpp::elastic_pool<Config>>(capacity, typename Config::backing_type::options{},
                                                                 typename Config::growth_type{},
                                                                 budget->register_model("mr", capacity));
        } else {
            pool = std::make_unique<vmmpp::elastic_pool<Config>>(capacity);
        }
    }
};

#if __has_include(<cuda/__memory_resource/resource_ref.h>)
using device_ref = cuda::mr::async_resource_ref<cuda::mr::device_accessible>;
void* allocate_on(device_ref& r, std::size_t bytes, cudaStream_t s) { return r.allocate_async(bytes, 256, s); }
void deallocate_on(device_ref& r, void* p, std::size_t bytes, cudaStream_t s) { r.deallocate_async(p, bytes, 256, s); }
#else
using device_ref = cuda::mr::resource_ref<cuda::mr::device_accessible>;
void* allocate_on(device_ref& r, std::size_t bytes, cudaStream_t s) { return r.allocate(s, bytes, 256); }
void deallocate_on(device_ref& r, void* p, std::size_t bytes, cudaStream_t s) { r.deallocate(s, p, bytes, 256); }
#endif

using configs = boost::mpl::list<vmmpp::elastic_config, vmmpp::gh200_config, vmmpp::static_config>;

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(kernels_use_what_a_resource_ref_hands_out, Config, configs) {
    made_pool<Config> made(256 * MiB);
    auto& pool = *made.pool;
    vmmpp::pool_memory_resource mr(pool);
    device_ref ref{mr};
    cudaStream_t s = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const std::size_t sizes[] = {1, 300, 4096, MiB + 7, 5 * MiB, 17 * MiB + 256};
    std::vector<unsigned char*> ps;
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
        ps.push_back(static_cast<unsigned char*>(allocate_on(ref, sizes[i], s)));
        fill<<<64, 256, 0, s>>>(ps.back(), sizes[i], static_cast<unsigned char>(i + 1));
    }
    unsigned long long* bad = nullptr;
    cuda_check(cudaMallocManaged(&bad, sizeof *bad));
    *bad = 0;
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
        spin_then_count<<<64, 256, 0, s>>>(ps[i], sizes[i], static_cast<unsigned char>(i + 1), 0, bad);
    }
    cuda_check(cudaStreamSynchronize(s));
    cuda_check(cudaGetLastError());
    BOOST_TEST(*bad == 0u);  // every allocation kept its own bytes: none overlaps another
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
        deallocate_on(ref, ps[i], sizes[i], s);
    }
    cuda_check(cudaStreamSynchronize(s));
    (void)pool.synchronize();
    (void)pool.trim();
    if constexpr (Config::growth_type::is_elastic) {
        BOOST_TEST(pool.committed_bytes() == 0u);
    }
    BOOST_TEST(mr.allocated_bytes() == 0u);
    cuda_check(cudaFree(bad));
    cuda_check(cudaStreamDestroy(s));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(deallocate_async_waits_for_the_kernel_still_reading, Config, configs) {
    made_pool<Config> made(64 * MiB);
    auto& pool = *made.pool;
    vmmpp::pool_memory_resource mr(pool);
    cudaStream_t s = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned long long* bad = nullptr;
    cuda_check(cudaMallocManaged(&bad, sizeof *bad));
    *bad = 0;
    const std::size_t bytes = 48 * MiB;
    auto* p = static_cast<unsigned char*>(mr.allocate_async(bytes, 256, s));
    fill<<<64, 256, 0, s>>>(p, bytes, 0x6d);
    spin_then_count<<<64, 256, 0, s>>>(p, bytes, 0x6d, spin_cycles(), bad);
    mr.deallocate_async(p, bytes, 256, s);  // the kernel spins for ~300 ms yet
    (void)pool.trim();                       // asks for memory back at once: nothing under the kernel goes
    // A sync allocation elsewhere, then one that fits only in the freed range: it waits for the kernel.
    auto* q = static_cast<unsigned char*>(mr.allocate(8 * MiB, 256));
    BOOST_TEST((q >= p + bytes));
    auto* r = static_cast<unsigned char*>(mr.allocate(bytes, 256));
    BOOST_TEST(r == p);
    cuda_check(cudaMemset(r, 0, bytes));  // were the kernel still running, this would change its count
    cuda_check(cudaStreamSynchronize(s));
    cuda_check(cudaGetLastError());
    BOOST_TEST(*bad == 0u);
    mr.deallocate(q, 8 * MiB);
    mr.deallocate(r, bytes);
    cuda_check(cudaFree(bad));
    cuda_check(cudaStreamDestroy(s));
}
