// vmmpp::pool_memory_resource (vmmpp/interop/cuda_mr.hpp), a pool as a CCCL memory resource: on
// the host backing for real, and on elastic_config (vmm) over the fake driver (support/fakecuda),
// where the GPU can be held so that a deallocate_async lies behind queued stream work.
#define BOOST_TEST_MODULE cuda_mr resource
#include "support/cpu_main.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/interop/cuda_mr.hpp"

namespace fakecuda = vmmpp_test::fakecuda;

namespace {

using host_mr = vmmpp::pool_memory_resource<vmmpp::host_config>;
using vmm_mr = vmmpp::pool_memory_resource<vmmpp::elastic_config>;
using managed_mr = vmmpp::pool_memory_resource<vmmpp::gh200_config>;

// The resource models CCCL's concepts under the names of the CCCL at hand: 2.x and 3.0 (CUDA 12,
// CUDA 13.0) keep resource_ref.h; later CCCL (3.5) dropped it with the rename.
#if __has_include(<cuda/__memory_resource/resource_ref.h>)
static_assert(cuda::mr::resource<vmm_mr>);
static_assert(cuda::mr::async_resource_with<vmm_mr, cuda::mr::device_accessible>);
static_assert(!cuda::mr::resource_with<vmm_mr, cuda::mr::host_accessible>);
static_assert(cuda::mr::async_resource_with<host_mr, cuda::mr::host_accessible>);
static_assert(!cuda::mr::resource_with<host_mr, cuda::mr::device_accessible>);
static_assert(cuda::mr::async_resource_with<managed_mr, cuda::mr::device_accessible, cuda::mr::host_accessible>);
template <class... P>
using sync_ref = cuda::mr::resource_ref<P...>;
template <class... P>
using stream_ref_of = cuda::mr::async_resource_ref<P...>;
#define VMMPP_TEST_ALLOCATE_SYNC allocate
#define VMMPP_TEST_DEALLOCATE_SYNC deallocate
#else
static_assert(cuda::mr::synchronous_resource<vmm_mr>);
static_assert(cuda::mr::resource_with<vmm_mr, cuda::mr::device_accessible>);
static_assert(!cuda::mr::synchronous_resource_with<vmm_mr, cuda::mr::host_accessible>);
static_assert(cuda::mr::resource_with<host_mr, cuda::mr::host_accessible>);
static_assert(!cuda::mr::synchronous_resource_with<host_mr, cuda::mr::device_accessible>);
static_assert(cuda::mr::resource_with<managed_mr, cuda::mr::device_accessible, cuda::mr::host_accessible>);
template <class... P>
using sync_ref = cuda::mr::synchronous_resource_ref<P...>;
template <class... P>
using stream_ref_of = cuda::mr::resource_ref<P...>;
#define VMMPP_TEST_ALLOCATE_SYNC allocate_sync
#define VMMPP_TEST_DEALLOCATE_SYNC deallocate_sync
#endif
static_assert(vmmpp::has_property<host_mr, vmmpp::host_accessible>);
static_assert(!vmmpp::has_property<host_mr, vmmpp::device_accessible>);

constexpr std::size_t page = std::size_t{2} << 20;  // host_config's page

struct block {
    std::byte* p;
    std::size_t bytes;
    std::size_t alignment;
};

/// Allocates blocks of many sizes (1 byte to past a page) and alignments (1 to a page), fills
/// each with a byte of its own, and checks them aligned, inside the span and disjoint.
template <class Resource>
std::vector<block> allocate_many(Resource& mr, std::size_t count) {
    std::mt19937 rng(7);
    const std::size_t sizes[] = {1, 8, 255, 256, 257, 1000, 4096, 65536, 100000, page - 1, page + 3};
    std::vector<block> blocks;
    for (std::size_t i = 0; i < count; ++i) {
        const std::size_t bytes = sizes[rng() % std::size(sizes)];
        const std::size_t alignment = std::size_t{1} << (rng() % 22);  // 1 B .. 2 MiB
        auto* p = static_cast<std::byte*>(mr.allocate(bytes, alignment));
        blocks.push_back({p, bytes, alignment});
    }
    const std::byte* base = mr.pool().base();
    for (const block& b : blocks) {
        BOOST_TEST(reinterpret_cast<std::uintptr_t>(b.p) % std::max<std::size_t>(b.alignment, 256) == 0u);
        BOOST_TEST((b.p >= base && b.p + b.bytes <= base + mr.pool().capacity()));
    }
    std::vector<block> sorted = blocks;
    std::sort(sorted.begin(), sorted.end(), [](const block& a, const block& b) { return a.p < b.p; });
    for (std::size_t i = 1; i < sorted.size(); ++i) {
        BOOST_TEST((sorted[i - 1].p + sorted[i - 1].bytes <= sorted[i].p), "blocks overlap at " << i);
    }
    return blocks;
}

/// Fills each block with its own byte (through the host: host or fake device memory), then
/// checks every block still holds it: a write through one never reached another.
void check_writable(const std::vector<block>& blocks) {
    for (std::size_t i = 0; i < blocks.size(); ++i) {
        std::memset(blocks[i].p, static_cast<int>(i % 251 + 1), blocks[i].bytes);
    }
    std::size_t bad = 0;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
        for (std::size_t j = 0; j < blocks[i].bytes; ++j) {
            bad += blocks[i].p[j] != static_cast<std::byte>(i % 251 + 1);
        }
    }
    BOOST_TEST(bad == 0u);
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);

BOOST_AUTO_TEST_SUITE(on_the_host_backing)

BOOST_AUTO_TEST_CASE(many_sizes_and_alignments_are_aligned_disjoint_writable_and_committed_as_used) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(64 * page);
    vmmpp::pool_memory_resource mr(pool);
    BOOST_TEST(pool.committed_bytes() == 0u);
    const auto blocks = allocate_many(mr, 200);
    check_writable(blocks);
    std::size_t rounded = 0;
    for (const block& b : blocks) {
        rounded += (std::max<std::size_t>(b.bytes, 1) + 255) / 256 * 256;
    }
    BOOST_TEST(mr.allocated_bytes() == rounded);
    // Committed as used: at least what is handed out, and not the whole span.
    BOOST_TEST(pool.committed_bytes() >= rounded);
    BOOST_TEST(pool.committed_bytes() < pool.capacity());
    for (std::size_t i = 0; i < blocks.size(); i += 2) {
        mr.deallocate(blocks[i].p, blocks[i].bytes, blocks[i].alignment);
    }
    for (std::size_t i = 1; i < blocks.size(); i += 2) {
        mr.deallocate(blocks[i].p, blocks[i].bytes, blocks[i].alignment);
    }
    BOOST_TEST(mr.allocated_bytes() == 0u);
    BOOST_TEST(pool.committed_bytes() == 0u);  // every page went back (page_granular, no spares)
    // The free ranges merged again: the whole span is one allocation.
    void* all = mr.allocate(pool.capacity(), page);
    BOOST_TEST(all == static_cast<void*>(pool.base()));
    BOOST_TEST(pool.committed_bytes() == pool.capacity());
    mr.deallocate(all, pool.capacity());
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(small_allocations_share_a_page) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(8 * page);
    vmmpp::pool_memory_resource mr(pool);
    void* a = mr.allocate(100, 8);
    void* b = mr.allocate(100, 8);
    BOOST_TEST(static_cast<std::byte*>(b) - static_cast<std::byte*>(a) == 256);
    BOOST_TEST(pool.committed_bytes() == page);
    mr.deallocate(a, 100);
    BOOST_TEST(pool.committed_bytes() == page);  // b still lies on it
    mr.deallocate(b, 100);
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(misuse_is_refused_with_vmmpp_errors) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(4 * page);
    vmmpp::pool_memory_resource mr(pool);
    BOOST_CHECK_THROW((void)mr.allocate(10, 3), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)mr.allocate(5 * page, 256), vmmpp::out_of_memory);
    BOOST_CHECK_THROW((void)mr.allocate(10, std::size_t{1} << 63), vmmpp::out_of_memory);  // no address fits
    void* p = mr.allocate(1000, 256);
    BOOST_CHECK_THROW(mr.deallocate(p, 2000), vmmpp::invalid_argument);          // another size
    BOOST_CHECK_THROW(mr.deallocate(static_cast<std::byte*>(p) + 256, 10), vmmpp::invalid_argument);
    mr.deallocate(p, 1000);
    BOOST_CHECK_THROW(mr.deallocate(p, 1000), vmmpp::invalid_argument);          // twice
    int on_the_stack = 0;
    BOOST_CHECK_THROW(mr.deallocate(&on_the_stack, sizeof on_the_stack), vmmpp::invalid_argument);
    // A span cut up so that no free range fits: out_of_memory, and nothing changed.
    void* low = mr.allocate(page, 256);
    void* mid = mr.allocate(page, 256);
    void* high = mr.allocate(2 * page, 256);
    mr.deallocate(mid, page);
    BOOST_CHECK_THROW((void)mr.allocate(page + 1, 256), vmmpp::out_of_memory);
    BOOST_TEST(mr.allocated_bytes() == 3 * page);
    BOOST_TEST(mr.allocate(page, 256) == mid);
    mr.deallocate(mid, page);
    mr.deallocate(low, page);
    mr.deallocate(high, 2 * page);
}

BOOST_AUTO_TEST_CASE(copies_are_equal_separate_resources_are_not) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(4 * page);
    vmmpp::pool_memory_resource a(pool);
    const auto copy = a;
    vmmpp::pool_memory_resource other(pool);
    BOOST_TEST((a == copy));
    BOOST_TEST((a != other));
    void* p = a.allocate(10, 16);
    auto freer = copy;
    freer.deallocate(p, 10);  // a copy frees what the original handed out
    BOOST_TEST(a.allocated_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(through_cccls_host_accessible_resource_ref) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(4 * page);
    vmmpp::pool_memory_resource mr(pool);
    sync_ref<cuda::mr::host_accessible> ref{mr};
    auto* p = static_cast<unsigned char*>(ref.VMMPP_TEST_ALLOCATE_SYNC(3000, 512));
    BOOST_TEST(reinterpret_cast<std::uintptr_t>(p) % 512 == 0u);
    std::memset(p, 0x7e, 3000);
    BOOST_TEST(mr.allocated_bytes() == 3072u);
    BOOST_TEST(pool.committed_bytes() == page);
    ref.VMMPP_TEST_DEALLOCATE_SYNC(p, 3000, 512);
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(threads_allocate_and_free_concurrently_without_sharing_bytes) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(64 * page);
    vmmpp::pool_memory_resource mr(pool);
    std::vector<std::thread> threads;
    std::vector<std::size_t> bad(4, 0);
    for (unsigned t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937 rng(t);
            std::vector<std::pair<unsigned char*, std::size_t>> held;
            for (int i = 0; i < 400; ++i) {
                if (held.size() > 8 || (!held.empty() && rng() % 3 == 0)) {
                    const auto [p, bytes] = held[rng() % held.size()];
                    for (std::size_t j = 0; j < bytes; ++j) {
                        bad[t] += p[j] != static_cast<unsigned char>(t + 1);  // another thread's write?
                    }
                    mr.deallocate(p, bytes);
                    std::erase(held, std::make_pair(p, bytes));
                } else {
                    const std::size_t bytes = 1 + rng() % (page / 2);  // at most 36 MiB held of 128
                    auto* p = static_cast<unsigned char*>(mr.allocate(bytes, std::size_t{1} << (rng() % 13)));
                    std::memset(p, static_cast<int>(t + 1), bytes);
                    held.emplace_back(p, bytes);
                }
            }
            for (const auto& [p, bytes] : held) {
                mr.deallocate(p, bytes);
            }
        });
    }
    for (auto& th : threads) {
        th.join();
    }
    BOOST_TEST(bad == std::vector<std::size_t>(4, 0), boost::test_tools::per_element());
    BOOST_TEST(mr.allocated_bytes() == 0u);
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(host_deallocate_async_frees_at_once) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(4 * page);
    vmmpp::pool_memory_resource mr(pool);
    void* p = mr.allocate_async(page, 256, cuda::stream_ref(cudaStream_t{}));
    mr.deallocate_async(p, page, 256, cuda::stream_ref(cudaStream_t{}));  // host memory has no fences
    BOOST_TEST(mr.pending_bytes() == 0u);
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_SUITE(on_vmm_over_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(many_sizes_and_alignments_and_memory_follows_use) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    const std::size_t span = (std::size_t{128} << 20) / g * g;
    const std::size_t mapped_before = fakecuda::mapped_bytes();
    vmmpp::budget budget(span);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(span, {}, {}, budget.register_model("mr", span));
    vmmpp::pool_memory_resource mr(pool);
    const auto blocks = allocate_many(mr, 120);
    check_writable(blocks);  // the fake's mappings are host memory
    BOOST_TEST(fakecuda::mapped_bytes() > mapped_before);
    BOOST_TEST(pool.committed_bytes() < pool.capacity());
    for (const block& b : blocks) {
        mr.deallocate(b.p, b.bytes, b.alignment);
    }
    (void)pool.trim();  // spares the growth policy kept
    BOOST_TEST(pool.committed_bytes() == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() == mapped_before);
    BOOST_TEST(budget.stats().committed == 0u);
}

BOOST_AUTO_TEST_CASE(over_quota_is_vmmpps_and_allocates_nothing) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(64 * g);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(16 * g, {}, {}, budget.register_model("mr", 2 * g));
    vmmpp::pool_memory_resource mr(pool);
    BOOST_CHECK_THROW((void)mr.allocate(3 * g, 256), vmmpp::over_quota);
    BOOST_TEST(mr.allocated_bytes() == 0u);
    void* p = mr.allocate(2 * g, 256);  // the range refused is free again
    BOOST_TEST(p == static_cast<void*>(pool.base()));
    mr.deallocate(p, 2 * g);
}

BOOST_AUTO_TEST_CASE(deallocate_async_keeps_the_memory_until_the_stream_ran) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(64 * g);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(8 * g, {}, {}, budget.register_model("mr", 8 * g));
    vmmpp::pool_memory_resource mr(pool);
    fakecuda::stream s;
    auto* p = static_cast<std::byte*>(mr.allocate_async(3 * g, 256, cuda::stream_ref(s.get())));
    std::memset(p, 0x5c, 3 * g);
    vmmpp_test::queued_reads reads(s.get());
    fakecuda::hold_gpu(true);
    reads.read(p, 3 * g);  // queued: the GPU is held
    const std::size_t mapped = fakecuda::mapped_bytes();
    mr.deallocate_async(p, 3 * g, 256, cuda::stream_ref(s.get()));
    (void)pool.trim();
    (void)pool.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // nothing unmapped under the queued read
    BOOST_TEST(pool.is_committed(0, 3 * g));
    BOOST_TEST(mr.pending_bytes() == 3 * g);
    // Nor is the range handed out again meanwhile: a new owner could write it under the read.
    void* q = mr.allocate(g, 256);
    BOOST_TEST((static_cast<std::byte*>(q) >= p + 3 * g));
    mr.deallocate(q, g);

    fakecuda::run_stream(s.get());
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x5c) == 0u);
    (void)pool.collect();
    (void)pool.trim();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);  // and now it went back
    BOOST_TEST(pool.committed_bytes() == 0u);
    void* again = mr.allocate(g, 256);  // the range is free again
    BOOST_TEST(again == static_cast<void*>(p));
    BOOST_TEST(mr.pending_bytes() == 0u);
    mr.deallocate(again, g);
}

BOOST_AUTO_TEST_CASE(allocate_async_takes_pending_ranges_by_making_its_stream_wait) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(64 * g);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(4 * g, {}, {}, budget.register_model("mr", 4 * g));
    vmmpp::pool_memory_resource mr(pool);
    fakecuda::stream reader, writer;
    auto* p = static_cast<std::byte*>(mr.allocate(4 * g, 256));  // the whole span
    std::memset(p, 0x21, 4 * g);
    vmmpp_test::queued_reads reads(reader.get());
    fakecuda::hold_gpu(true);
    reads.read(p, 4 * g);
    mr.deallocate_async(p, 4 * g, 256, cuda::stream_ref(reader.get()));
    const std::size_t queued_on_writer = fakecuda::queued_on(writer.get());
    // Only the pending range fits: the writer's stream waits for the read instead of the caller.
    void* q = mr.allocate_async(4 * g, 256, cuda::stream_ref(writer.get()));
    BOOST_TEST(q == static_cast<void*>(p));
    BOOST_TEST(fakecuda::queued_on(writer.get()) == queued_on_writer + 1);  // the wait
    BOOST_TEST(fakecuda::queued_on(reader.get()) > 0u);                   // the read has not run
    fakecuda::hold_gpu(false);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x21) == 0u);
    mr.deallocate(q, 4 * g);
}

BOOST_AUTO_TEST_CASE(allocate_waits_for_pending_ranges_when_nothing_else_fits) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(64 * g);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(4 * g, {}, {}, budget.register_model("mr", 4 * g));
    vmmpp::pool_memory_resource mr(pool);
    fakecuda::stream reader;
    auto* p = static_cast<std::byte*>(mr.allocate(4 * g, 256));
    std::memset(p, 0x42, 4 * g);
    vmmpp_test::queued_reads reads(reader.get());
    fakecuda::hold_gpu(true);
    reads.read(p, 4 * g);
    mr.deallocate_async(p, 4 * g, 256, cuda::stream_ref(reader.get()));
    void* q = mr.allocate(2 * g, 256);  // waits for the fence (the fake's GPU runs up to it)
    BOOST_TEST(q == static_cast<void*>(p));
    BOOST_TEST(fakecuda::queued_on(reader.get()) == 0u);
    BOOST_TEST(reads.differing(0x42) == 0u);  // the read ran before the range was handed out
    BOOST_TEST(mr.pending_bytes() == 0u);
    mr.deallocate(q, 2 * g);
}

BOOST_AUTO_TEST_CASE(through_cccls_device_accessible_resource_ref) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(64 * g);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(8 * g, {}, {}, budget.register_model("mr", 8 * g));
    vmmpp::pool_memory_resource mr(pool);
    fakecuda::stream s;
    sync_ref<cuda::mr::device_accessible> ref{mr};
    void* a = ref.VMMPP_TEST_ALLOCATE_SYNC(5000, 1024);
    BOOST_TEST(reinterpret_cast<std::uintptr_t>(a) % 1024 == 0u);
    BOOST_TEST(pool.is_committed(0, 5000));
    stream_ref_of<cuda::mr::device_accessible> async_ref{mr};
#if __has_include(<cuda/__memory_resource/resource_ref.h>)
    void* b = async_ref.allocate_async(g, 256, cuda::stream_ref(s.get()));
#else
    void* b = async_ref.allocate(cuda::stream_ref(s.get()), g, 256);
#endif
    BOOST_TEST(b != a);
    fakecuda::hold_gpu(true);
    vmmpp_test::queued_reads reads(s.get());
    reads.read(static_cast<std::byte*>(b), g);
#if __has_include(<cuda/__memory_resource/resource_ref.h>)
    async_ref.deallocate_async(b, g, 256, cuda::stream_ref(s.get()));
#else
    async_ref.deallocate(cuda::stream_ref(s.get()), b, g, 256);
#endif
    BOOST_TEST(mr.pending_bytes() == g);
    fakecuda::hold_gpu(false);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    ref.VMMPP_TEST_DEALLOCATE_SYNC(a, 5000, 1024);
    (void)mr.allocate(256, 256);  // takes the completed fence's range back
    BOOST_TEST(mr.pending_bytes() == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
