// The fake CUDA driver itself (support/fakecuda), so tests that rely on it rely on checked
// behaviour: one FIFO "GPU" that runs stream work at once or queues it while held, events that
// complete with it, a copy into memory unmapped under it that loses the context (sticky
// CUDA_ERROR_ILLEGAL_ADDRESS), the VMM rules the real driver enforces, the memory limit, shared
// handles, and planned failures.
#define BOOST_TEST_MODULE fake CUDA driver
#include "support/cpu_main.hpp"

#include <unistd.h>

#include <cstring>
#include <vector>

#include "support/fakecuda.hpp"
#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/driver/handles.hpp"

namespace fakecuda = vmmpp_test::fakecuda;

namespace {

struct the_fake_driver_is_loaded {
    the_fake_driver_is_loaded() { fakecuda::require(); }
};

std::size_t granule() { return vmmpp::vmm_granularity(0); }

CUdeviceptr address(const std::byte* p) { return reinterpret_cast<CUdeviceptr>(p); }

/// An event of the fake, destroyed at the end of the scope.
struct event {
    CUevent e = nullptr;
    event() { vmmpp::driver::check(vmmpp::driver::get().event_create(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate"); }
    ~event() { (void)vmmpp::driver::get().event_destroy(e); }
    event(const event&) = delete;
    event& operator=(const event&) = delete;
};

} // namespace

BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(stream_work_runs_at_once_or_queues_while_held) {
    const std::size_t g = granule();
    const auto& d = vmmpp::driver::get();
    vmmpp::vmm b(4 * g);
    b.commit(0, g);
    vmmpp::primary_context ctx(0);
    vmmpp::scoped_context current(ctx);
    std::vector<unsigned char> host(g, 0x5a);

    event never_recorded;
    BOOST_TEST(d.event_query(never_recorded.e) == CUDA_SUCCESS);

    event done;
    fakecuda::hold_gpu(true);
    BOOST_TEST(d.memcpy_htod_async(address(b.base()), host.data(), g, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(d.event_record(done.e, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(fakecuda::queued() == 2u);
    BOOST_TEST(d.event_query(done.e) == CUDA_ERROR_NOT_READY);
    BOOST_TEST(static_cast<int>(b.base()[g - 1]) == 0);  // not run yet
    BOOST_TEST(d.event_synchronize(done.e) == CUDA_SUCCESS);  // the GPU finishes up to the record
    BOOST_TEST(fakecuda::queued() == 0u);
    BOOST_TEST(d.event_query(done.e) == CUDA_SUCCESS);
    BOOST_TEST(static_cast<int>(b.base()[g - 1]) == 0x5a);

    // Device to device, still held: runs with run_gpu(), in order.
    BOOST_TEST(d.event_record(done.e, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(d.memcpy_async(address(b.base() + 100), address(b.base()), 10, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(d.event_query(done.e) == CUDA_ERROR_NOT_READY);
    fakecuda::run_gpu();
    BOOST_TEST(d.event_query(done.e) == CUDA_SUCCESS);

    fakecuda::hold_gpu(false);  // at once again
    std::memset(host.data(), 0x33, g);
    BOOST_TEST(d.memcpy_htod_async(address(b.base()), host.data(), g, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(d.event_record(done.e, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(fakecuda::queued() == 0u);
    BOOST_TEST(d.event_query(done.e) == CUDA_SUCCESS);
    BOOST_TEST(static_cast<int>(b.base()[0]) == 0x33);
}

// cuStreamGetCtx as the real driver's: a created stream answers the context current at its
// creation; the legacy default stream (nullptr, CU_STREAM_LEGACY) the calling thread's current
// one, CUDA_ERROR_INVALID_CONTEXT without one; an unknown stream is an invalid handle.
BOOST_AUTO_TEST_CASE(a_stream_knows_its_context) {
    const auto& d = vmmpp::driver::get();
    vmmpp::primary_context ctx(0);
    fakecuda::stream s;
    CUcontext current = nullptr;
    BOOST_TEST(d.ctx_get_current(&current) == CUDA_SUCCESS);
    BOOST_TEST_REQUIRE(current == nullptr);  // none on this thread, outside the stream's creation
    CUcontext got = nullptr;
    BOOST_TEST(d.stream_get_ctx(s, &got) == CUDA_SUCCESS);
    BOOST_TEST(got == ctx.get());
    BOOST_TEST(d.stream_get_ctx(nullptr, &got) == CUDA_ERROR_INVALID_CONTEXT);
    {
        vmmpp::scoped_context in(ctx);
        got = nullptr;
        BOOST_TEST(d.stream_get_ctx(nullptr, &got) == CUDA_SUCCESS);
        BOOST_TEST(got == ctx.get());
        got = nullptr;
        BOOST_TEST(d.stream_get_ctx(CU_STREAM_LEGACY, &got) == CUDA_SUCCESS);
        BOOST_TEST(got == ctx.get());
    }
    int not_a_stream = 0;
    BOOST_TEST(d.stream_get_ctx(reinterpret_cast<CUstream>(&not_a_stream), &got) == CUDA_ERROR_INVALID_HANDLE);
}

BOOST_AUTO_TEST_CASE(a_copy_into_memory_unmapped_under_it_loses_the_context) {
    const std::size_t g = granule();
    const auto& d = vmmpp::driver::get();
    vmmpp::vmm b(4 * g);
    b.commit(0, g);
    vmmpp::primary_context ctx(0);
    std::vector<unsigned char> host(g, 1);
    vmmpp::scoped_context current(ctx);
    event done;
    fakecuda::hold_gpu(true);
    BOOST_TEST(d.memcpy_htod_async(address(b.base()), host.data(), g, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(d.event_record(done.e, nullptr) == CUDA_SUCCESS);
    b.decommit(0, g);  // the driver unmaps at once, under the queued copy
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    fakecuda::run_gpu();
    BOOST_TEST(fakecuda::sticky_error() == CUDA_ERROR_ILLEGAL_ADDRESS);
    BOOST_TEST(d.event_query(done.e) == CUDA_ERROR_ILLEGAL_ADDRESS);  // every call, from now on
    BOOST_CHECK_THROW(b.commit(0, g), vmmpp::cuda_error);
    BOOST_TEST(b.committed_bytes() == 0u);
    fakecuda::reset();
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(d.event_query(done.e) == CUDA_SUCCESS);
    b.commit(0, g);

    // A copy from host memory into a mapped range that has no access yet is as bad.
    vmmpp::address_reservation r(g, g);
    vmmpp::physical_allocation a(0, g);
    BOOST_TEST_REQUIRE(d.mem_map(r.base(), g, 0, a.get(), 0) == CUDA_SUCCESS);
    BOOST_TEST(d.memcpy_htod_async(r.base(), host.data(), g, nullptr) == CUDA_SUCCESS);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_ERROR_ILLEGAL_ADDRESS);
    fakecuda::reset();
    BOOST_TEST(d.mem_unmap(r.base(), g) == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(vmm_rules_are_the_drivers) {
    const std::size_t g = granule();
    const auto& d = vmmpp::driver::get();
    vmmpp::address_reservation r(4 * g, g);
    vmmpp::physical_allocation a(0, 2 * g);
    BOOST_TEST(d.mem_map(r.base(), g, g, a.get(), 0) == CUDA_ERROR_INVALID_VALUE);  // at an offset into it
    BOOST_TEST(d.mem_map(r.base(), g, 0, a.get(), 0) == CUDA_ERROR_INVALID_VALUE);  // part of it
    BOOST_TEST(d.mem_map(r.base() + 3 * g, 2 * g, 0, a.get(), 0) == CUDA_ERROR_INVALID_VALUE);  // past the end
    BOOST_TEST_REQUIRE(d.mem_map(r.base(), 2 * g, 0, a.get(), 0) == CUDA_SUCCESS);
    BOOST_TEST(d.mem_map(r.base() + g, 2 * g, 0, a.get(), 0) == CUDA_ERROR_INVALID_VALUE);  // overlaps
    BOOST_TEST(d.mem_unmap(r.base(), g) == CUDA_ERROR_INVALID_VALUE);  // part of a mapping
    BOOST_TEST(d.mem_address_free(r.base(), r.bytes()) == CUDA_ERROR_INVALID_VALUE);  // still mapped
    BOOST_TEST(fakecuda::mapped_bytes() == 2 * g);
    BOOST_TEST(d.mem_unmap(r.base(), 2 * g) == CUDA_SUCCESS);
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);

    // Released while mapped: the memory stays until the unmap, as the driver's does.
    vmmpp::physical_allocation b(0, g);
    vmmpp::mapping m(r.base(), b, std::vector<int>{0});
    std::memset(reinterpret_cast<void*>(r.base()), 0x7e, g);
    b.reset();
    BOOST_TEST(static_cast<int>(reinterpret_cast<const unsigned char*>(r.base())[g - 1]) == 0x7e);
}

BOOST_AUTO_TEST_CASE(device_memory_is_limited_and_handles_are_shared_through_descriptors) {
    const std::size_t g = granule();
    vmmpp::vmm big(std::size_t{2} << 30);
    BOOST_CHECK_THROW(big.commit(0, (std::size_t{1} << 30) + g), vmmpp::out_of_memory);  // 1 GiB device
    BOOST_TEST(big.committed_bytes() == 0u);

    vmmpp::address_reservation r(2 * g, g);
    vmmpp::physical_allocation a(0, g);
    vmmpp::detail::unique_fd fd = a.export_fd();
    const std::size_t handles = fakecuda::live_handles();
    vmmpp::physical_allocation imported = vmmpp::physical_allocation::import_fd(fd.get(), g);
    fd.reset();
    BOOST_TEST(fakecuda::live_handles() == handles + 1);
    vmmpp::mapping m1(r.base(), a, std::vector<int>{0});
    vmmpp::mapping m2(r.base() + g, imported, std::vector<int>{0});
    std::memset(reinterpret_cast<void*>(r.base()), 0x42, g);
    BOOST_TEST(static_cast<int>(reinterpret_cast<const unsigned char*>(r.base() + g)[17]) == 0x42);
}

BOOST_AUTO_TEST_CASE(a_planned_failure_fires_once_at_the_nth_call_and_does_nothing) {
    const std::size_t g = granule();
    const auto& d = vmmpp::driver::get();
    const CUmemAllocationProp prop = vmmpp::device_allocation_prop(0);
    const std::size_t calls = fakecuda::calls("cuMemCreate");
    const std::size_t handles = fakecuda::live_handles();
    fakecuda::fail("cuMemCreate", 2, CUDA_ERROR_OUT_OF_MEMORY);
    CUmemGenericAllocationHandle h[3]{};
    BOOST_TEST(d.mem_create(&h[0], g, &prop, 0) == CUDA_SUCCESS);
    BOOST_TEST(d.mem_create(&h[1], g, &prop, 0) == CUDA_ERROR_OUT_OF_MEMORY);
    BOOST_TEST(fakecuda::live_handles() == handles + 1);
    BOOST_TEST(d.mem_create(&h[2], g, &prop, 0) == CUDA_SUCCESS);
    BOOST_TEST(fakecuda::calls("cuMemCreate") == calls + 3);
    BOOST_TEST(fakecuda::live_handle_bytes() >= 2 * g);
    BOOST_TEST(d.mem_release(h[0]) == CUDA_SUCCESS);
    BOOST_TEST(d.mem_release(h[2]) == CUDA_SUCCESS);
    BOOST_TEST(d.mem_release(h[2]) == CUDA_ERROR_INVALID_VALUE);
    BOOST_TEST(fakecuda::live_handles() == handles);
}

BOOST_AUTO_TEST_SUITE_END()
