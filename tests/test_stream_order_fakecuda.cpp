// Stream order on the fake driver (support/fakecuda; CI runs these for real): memory is never
// unmapped under queued GPU work. With the fake's GPU held, work queues instead of running, so
// each test can free, trim and reclaim while a copy is still queued, then let the GPU run and
// check that nothing faulted (the fake sets CUDA_ERROR_ILLEGAL_ADDRESS when a queued copy meets
// unmapped memory, as the real driver loses the context) and that the bytes arrived. Review F6.
#define BOOST_TEST_MODULE stream order on the fake driver
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <chrono>
#include <memory>
#include <span>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "support/fake_kv_cases.hpp"
#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::queued_reads;
using namespace std::chrono_literals;

namespace {


template <class Config, class Layout>
using kv_case = vmmpp_test::fake_kv_case<Config, Layout>;
using kv_cases = vmmpp_test::fake_kv_cases;
constexpr vmmpp::kv_geometry geom = vmmpp_test::fake_kv_geometry;
constexpr std::size_t piece = vmmpp_test::fake_kv_piece;
constexpr std::size_t budget_bytes = std::size_t{64} << 20;

/// Whether the case's blocks each fill a whole page that goes back when they empty (then
/// freeing one must unmap it): not for chunks, nor for elastic_config's extents and spares.
template <class Case>
constexpr bool block_is_page = std::is_same_v<typename Case::cache::layout_type, vmmpp::block_major> &&
                               std::is_same_v<typename Case::config, vmmpp::elastic_page_config>;

template <class Case>
struct made_cache {
    vmmpp::budget budget{budget_bytes};
    typename Case::cache cache{geom, {}, {}, budget.register_model("kv", budget_bytes)};
};

/// Fills every K and V piece of `block` with `value`, through the (host-visible) fake mapping.
template <class Cache>
void fill_block(Cache& c, std::int32_t block, unsigned char value) {
    vmmpp_test::fill_block_pieces(c, block, value, piece);
}
/// Bytes of `block` that differ from `value`.
template <class Cache>
std::size_t differing(const Cache& c, std::int32_t block, unsigned char value) {
    return vmmpp_test::differing_bytes(c, block, value, piece);
}

/// Queues reads of every K and V piece of `blocks` on `reads`' stream.
template <class Cache>
void read_blocks(queued_reads& reads, const Cache& c, std::span<const std::int32_t> blocks) {
    for (auto b : blocks) {
        reads.read_block(c, b, piece);
    }
}
/// Queues a write of `value` into every K and V piece of `block` on `stream` (copies from host
/// buffers that live until the end of the test program).
template <class Cache>
void write_block(const Cache& c, std::int32_t block, unsigned char value, CUstream stream) {
    static std::vector<std::unique_ptr<std::vector<unsigned char>>> sources;
    sources.push_back(std::make_unique<std::vector<unsigned char>>(piece, value));
    vmmpp::primary_context context{0};
    vmmpp::scoped_context current(context);
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        for (const std::byte* p : {c.key(l, block), c.value(l, block)}) {
            vmmpp::driver::check(vmmpp::driver::get().memcpy_async(reinterpret_cast<CUdeviceptr>(p),
                                                                    reinterpret_cast<CUdeviceptr>(sources.back()->data()),
                                                                    piece, stream),
                                 "cuMemcpyAsync(test write)");
        }
    }
}

/// Polls `done` for up to 5 s.
template <class F>
bool eventually(F done) {
    const auto give_up = std::chrono::steady_clock::now() + 5s;
    while (!done()) {
        if (std::chrono::steady_clock::now() > give_up) {
            return false;
        }
        std::this_thread::sleep_for(200us);
    }
    return true;
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(stream_order_on_the_fake_driver, fakecuda::clean_driver)

// The beam-search pattern: fork, an append that copies the shared partial block (queued), then
// free of the parent, whose last reference to the copy's source goes.
BOOST_AUTO_TEST_CASE_TEMPLATE(fork_append_free_parent_keeps_the_queued_copy_source, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    const auto parent = c.add_sequence();
    c.append(parent, 20);  // blocks 0 and 1, the second partial
    fill_block(c, 0, 0x50);
    fill_block(c, 1, 0x51);
    const auto child = c.fork(parent);

    fakecuda::hold_gpu(true);
    c.append(child, 1);
    BOOST_TEST(c.cow_copies() == 1u);
    BOOST_TEST(fakecuda::queued() > 0u);  // the copy has not run
    const std::size_t mapped = fakecuda::mapped_bytes();
    c.free(parent);
    (void)c.pool().trim();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // nothing unmapped under the queued copy
    if constexpr (block_is_page<Case>) {
        BOOST_TEST(c.pool().stats().awaiting_gpu_units == 1u);
    }
    fakecuda::hold_gpu(false);  // the GPU runs the copy
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    const auto table = c.block_table(child);
    BOOST_REQUIRE(table.size() == 2u);
    BOOST_TEST(differing(c, table[1], 0x51) == 0u);
    BOOST_TEST(differing(c, table[0], 0x50) == 0u);
    (void)c.collect();
    BOOST_TEST(c.pool().stats().awaiting_gpu_units == 0u);
    if constexpr (block_is_page<Case>) {
        BOOST_TEST(fakecuda::mapped_bytes() < mapped);  // and now the source's page went back
    }
}

// The engine frees (or truncates) a sequence while its own work still reads the blocks.
BOOST_AUTO_TEST_CASE_TEMPLATE(free_and_truncate_on_a_stream_wait_for_its_queued_reads, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    const auto s = c.add_sequence();
    c.append(s, 16 * 12);
    const auto t = c.add_sequence();
    c.append(t, 16 * 12);
    for (auto b : c.block_table(s)) {
        fill_block(c, b, 0x33);
    }
    for (auto b : c.block_table(t)) {
        fill_block(c, b, 0x44);
    }
    const std::vector<std::int32_t> s_blocks(c.block_table(s).begin(), c.block_table(s).end());
    const std::vector<std::int32_t> t_tail(c.block_table(t).begin() + 2, c.block_table(t).end());

    queued_reads s_reads, t_reads;
    fakecuda::hold_gpu(true);
    for (auto b : s_blocks) {
        for (std::uint32_t l = 0; l < geom.layers; ++l) {
            s_reads.read(c.key(l, b), piece);
            s_reads.read(c.value(l, b), piece);
        }
    }
    for (auto b : t_tail) {
        for (std::uint32_t l = 0; l < geom.layers; ++l) {
            t_reads.read(c.key(l, b), piece);
        }
    }
    const std::size_t mapped = fakecuda::mapped_bytes();
    const std::size_t charged = made.budget.stats().committed;
    c.free(s, nullptr);
    c.truncate(t, 20, nullptr);  // keeps 2 blocks
    BOOST_TEST(c.pool().trim() == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(made.budget.stats().committed == charged);  // still charged while the GPU may read
    BOOST_TEST(c.pool().stats().awaiting_gpu_units > 0u);
    fakecuda::hold_gpu(false);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(s_reads.differing(0x33) == 0u);
    BOOST_TEST(t_reads.differing(0x44) == 0u);
    (void)c.pool().trim();  // the work is done: the memory goes back (the release agent may have been first)
    BOOST_TEST(c.pool().stats().awaiting_gpu_units == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);
}

// Pages awaiting the GPU stay charged; another model's commit cannot reclaim them until the work
// is done, and can right after.
BOOST_AUTO_TEST_CASE(pages_awaiting_the_gpu_are_reclaimed_once_it_is_done) {
    const std::size_t page = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(4 * page);
    vmmpp::elastic_pool<vmmpp::elastic_page_config> a(16 * page, {}, {}, budget.register_model("a", 4 * page));
    vmmpp::elastic_pool<vmmpp::elastic_page_config> b(16 * page, {}, {}, budget.register_model("b", 4 * page));
    a.ensure_committed(0, 4 * page);
    std::memset(a.base(), 0x21, 4 * page);
    queued_reads reads;
    fakecuda::hold_gpu(true);
    reads.read(a.base(), 4 * page);
    a.release(0, 4 * page, cudaStream_t{nullptr});
    BOOST_TEST(a.stats().awaiting_gpu_units == 4u);
    BOOST_CHECK_THROW(b.ensure_committed(0, page), vmmpp::over_quota);  // only memory the GPU may read
    fakecuda::run_gpu();
    // The release agent, woken by the GPU, may be giving a's pages back right now (holding a's
    // lock, which a reclaim waits for only 20 ms): let it finish, or find nothing to do.
    (void)eventually([&] { return a.committed_bytes() == 0; });
    b.ensure_committed(0, page);  // reclaimed from a now (unless the release agent gave a's pages back first)
    BOOST_TEST(a.stats().reclaims + (a.stats().agent_released > 0 ? 1u : 0u) >= 1u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x21) == 0u);
    fakecuda::hold_gpu(false);
    b.release(0, page);
}

// The pool's destructor waits for the work behind every fence before it unmaps.
BOOST_AUTO_TEST_CASE(a_pool_destroyed_under_queued_work_waits_for_it) {
    const std::size_t page = vmmpp::vmm_granularity(0);
    queued_reads reads;
    {
        vmmpp::budget budget(8 * page);
        vmmpp::elastic_pool<vmmpp::elastic_page_config> pool(8 * page, {}, {}, budget.register_model("m", 8 * page));
        pool.ensure_committed(0, 2 * page);
        std::memset(pool.base(), 0x17, 2 * page);
        fakecuda::hold_gpu(true);
        reads.read(pool.base(), 2 * page);
        pool.release(0, page, cudaStream_t{nullptr});
    }  // the other page is still held: the destructor gives it back too
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x17) == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);
    fakecuda::hold_gpu(false);
}

// The background mapper gives idle spares back lazily: never before their fence completed.
BOOST_AUTO_TEST_CASE(the_mapper_waits_for_the_fence_before_a_lazy_release) {
    const std::size_t page = vmmpp::vmm_granularity(0);
    vmmpp::mapped_ahead<vmmpp::page_granular> growth;
    growth.low_watermark = 0;
    growth.high_watermark = 0;
    growth.release_delay = 1ms;
    vmmpp::budget budget(16 * page);
    using config = vmmpp::pool_config<vmmpp::vmm, vmmpp::mapped_ahead<vmmpp::page_granular>, vmmpp::shared_budget>;
    vmmpp::elastic_pool<config> pool(16 * page, {}, growth, budget.register_model("m", 16 * page));
    pool.ensure_committed(0, 2 * page);
    std::memset(pool.base(), 0x66, 2 * page);
    queued_reads reads;
    fakecuda::hold_gpu(true);
    reads.read(pool.base(), 2 * page);
    pool.release(0, 2 * page, cudaStream_t{nullptr});
    std::this_thread::sleep_for(50ms);  // 50 release delays
    BOOST_TEST(pool.committed_bytes() == 2 * page);
    BOOST_TEST(pool.stats().awaiting_gpu_units == 2u);
    fakecuda::run_gpu();
    BOOST_TEST(eventually([&] { return pool.committed_bytes() == 0; }));
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x66) == 0u);
    fakecuda::hold_gpu(false);
}

// A release after a fence from another pool (or a made-up one) is refused and changes nothing.
BOOST_AUTO_TEST_CASE(a_fence_the_pool_never_recorded_is_refused) {
    const std::size_t page = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(8 * page);
    vmmpp::elastic_pool<vmmpp::elastic_page_config> pool(8 * page, {}, {}, budget.register_model("m", 8 * page));
    pool.ensure_committed(0, page);
    BOOST_CHECK_THROW(pool.release(0, page, vmmpp::pool_fence{.value = 7}), vmmpp::invalid_argument);
    BOOST_TEST(pool.stats().held_pages == 1u);
    const auto f = pool.record_fence(nullptr);
    BOOST_TEST(f.value == 1u);
    pool.release(0, page, f);
    BOOST_TEST(pool.stats().fences == 1u);
    BOOST_TEST(pool.committed_bytes() == 0u);  // the GPU was idle: the fence had completed
}

// Review 2, G1: fork a into b; the engine reads the shared blocks on s1 and frees a there; b is
// freed on s2, which is idle. The pages must wait for s1 as well: s2's fence alone would let
// them go under s1's reads (a lost context on a GPU).
BOOST_AUTO_TEST_CASE_TEMPLATE(a_forked_block_waits_for_every_stream_that_freed_it, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    const auto a = c.add_sequence();
    c.append(a, 16 * 8);
    const std::vector<std::int32_t> blocks(c.block_table(a).begin(), c.block_table(a).end());
    for (auto blk : blocks) {
        fill_block(c, blk, 0x61);
    }
    const auto b = c.fork(a);
    fakecuda::stream s1, s2;
    queued_reads reads(s1);
    fakecuda::hold_gpu(true);
    read_blocks(reads, c, blocks);
    const std::size_t mapped = fakecuda::mapped_bytes();
    c.free(a, s1);  // every block still shared with b: nothing goes back yet, but s1 reads them
    c.free(b, s2);
    fakecuda::run_stream(s2);  // s2 is done, s1 is not
    (void)c.collect();
    (void)c.pool().trim();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(c.pool().stats().awaiting_gpu_units > 0u);
    fakecuda::run_gpu();
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x61) == 0u);
    (void)c.pool().trim();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);
    fakecuda::hold_gpu(false);
}

// The same for a truncate of a shared tail on one stream and the free of its other owner on another.
BOOST_AUTO_TEST_CASE_TEMPLATE(a_truncated_shared_tail_waits_for_both_streams, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    const auto a = c.add_sequence();
    c.append(a, 16 * 8);
    const std::vector<std::int32_t> tail(c.block_table(a).begin() + 2, c.block_table(a).end());
    for (auto blk : tail) {
        fill_block(c, blk, 0x62);
    }
    const auto b = c.fork(a);
    fakecuda::stream s1, s2;
    queued_reads reads(s1);
    fakecuda::hold_gpu(true);
    read_blocks(reads, c, tail);
    const std::size_t mapped = fakecuda::mapped_bytes();
    c.truncate(a, 32, s1);
    c.free(b, s2);
    fakecuda::run_stream(s2);
    (void)c.pool().trim();
    if constexpr (block_is_page<Case>) {  // a's two blocks still hold their pages; the tail's wait for s1
        BOOST_TEST(c.pool().stats().awaiting_gpu_units == tail.size());
    }
    fakecuda::run_gpu();
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x62) == 0u);
    (void)mapped;
    fakecuda::hold_gpu(false);
}

// A block freed on s1 while s1 still reads it is handed out again at once; the append's stream
// (here the cache's own) waits for s1's reads, so a write queued there after the append runs
// after them, never before.
BOOST_AUTO_TEST_CASE_TEMPLATE(a_reused_block_is_written_only_after_the_reads_before_its_free, Case, kv_cases) {
    fakecuda::stream cache_stream, s1;
    vmmpp::budget budget(budget_bytes);
    typename Case::cache c(geom, {}, {}, budget.register_model("kv", budget_bytes), {.stream = cache_stream});
    const auto a = c.add_sequence();
    c.append(a, 16 * 4);
    const std::vector<std::int32_t> blocks(c.block_table(a).begin(), c.block_table(a).end());
    for (auto blk : blocks) {
        fill_block(c, blk, 0x71);
    }
    queued_reads reads(s1);
    fakecuda::hold_gpu(true);
    read_blocks(reads, c, blocks);
    c.free(a, s1);
    const auto n = c.add_sequence();
    c.append(n, 16 * 4);  // the same ids, lowest first
    const std::vector<std::int32_t> reused(c.block_table(n).begin(), c.block_table(n).end());
    BOOST_TEST(reused == blocks);
    for (auto blk : reused) {
        write_block(c, blk, 0x72, cache_stream);
    }
    fakecuda::run_stream(cache_stream);
    BOOST_TEST(fakecuda::queued_on(cache_stream) > 0u);  // the writes wait for s1
    fakecuda::run_gpu();
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x71) == 0u);  // the reads saw the old KV
    for (auto blk : reused) {
        BOOST_TEST(differing(c, blk, 0x72) == 0u);
    }
    fakecuda::hold_gpu(false);
}

// Fences of different streams do not hold each other back: memory freed behind a finished
// stream goes back while another stream is still busy.
BOOST_AUTO_TEST_CASE(a_slow_stream_holds_back_only_its_own_releases) {
    using Case = kv_case<vmmpp::elastic_page_config, vmmpp::block_major>;
    made_cache<Case> made;
    auto& c = made.cache;
    const auto a = c.add_sequence();
    c.append(a, 16 * 4);
    const auto b = c.add_sequence();
    c.append(b, 16 * 4);
    fakecuda::stream slow, fast;
    queued_reads slow_reads(slow), fast_reads(fast);
    fakecuda::hold_gpu(true);
    read_blocks(slow_reads, c, c.block_table(a));
    read_blocks(fast_reads, c, c.block_table(b));
    const std::size_t mapped = fakecuda::mapped_bytes();
    c.free(a, slow);   // recorded first
    c.free(b, fast);
    fakecuda::run_stream(fast);
    (void)c.collect();  // (or the release agent, woken by the fast stream)
    BOOST_TEST(eventually([&] { return fakecuda::mapped_bytes() == mapped - 4 * c.pool().page_bytes(); }));  // b's 4 pages
    std::this_thread::sleep_for(10ms);
    BOOST_TEST(fakecuda::mapped_bytes() == mapped - 4 * c.pool().page_bytes());  // not a's
    fakecuda::run_gpu();
    BOOST_TEST(eventually([&] { return fakecuda::mapped_bytes() == mapped - 8 * c.pool().page_bytes(); }));
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    fakecuda::hold_gpu(false);
}

// Memory back when the GPU finishes, with no call: the engine frees behind queued work and goes
// idle; the release agent gives the pages back once the GPU has run that work.
BOOST_AUTO_TEST_CASE_TEMPLATE(memory_freed_behind_queued_work_goes_back_without_a_call, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    const auto a = c.add_sequence();
    c.append(a, 16 * 128);  // more than any growth policy keeps as spares
    fakecuda::stream s;
    queued_reads reads(s);
    fakecuda::hold_gpu(true);
    read_blocks(reads, c, c.block_table(a));
    const std::size_t committed = made.budget.stats().committed;
    c.free(a, s);
    std::this_thread::sleep_for(20ms);
    BOOST_TEST(made.budget.stats().committed == committed);  // the GPU has not run the reads
    fakecuda::run_gpu();                                      // it does now; the engine makes no call
    const std::size_t keep = committed / 2;  // whatever spares a growth policy keeps, most goes back
    BOOST_TEST(eventually([&] { return made.budget.stats().committed <= keep; }));
    BOOST_TEST(c.pool().stats().agent_released > 0u);
    BOOST_TEST(c.pool().stats().agent_wakeups >= 1u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    fakecuda::hold_gpu(false);
}

// Many frees on one stream behind one slow step queue one host function, not one each.
BOOST_AUTO_TEST_CASE(frees_behind_the_same_step_share_one_wakeup) {
    made_cache<kv_case<vmmpp::elastic_page_config, vmmpp::block_major>> made;
    auto& c = made.cache;
    std::vector<vmmpp::seq_id> seqs;
    for (int i = 0; i < 8; ++i) {
        seqs.push_back(c.add_sequence());
        c.append(seqs.back(), 16 * 2);
    }
    fakecuda::stream s;
    queued_reads reads(s);
    fakecuda::hold_gpu(true);
    for (auto q : seqs) {
        read_blocks(reads, c, c.block_table(q));
    }
    for (auto q : seqs) {
        c.free(q, s);
    }
    BOOST_TEST(c.pool().stats().agent_wakeups == 1u);  // fences on one stream complete in order: the last covers all
    fakecuda::run_gpu();
    BOOST_TEST(eventually([&] { return made.budget.stats().committed == 0; }));
    fakecuda::hold_gpu(false);
}

// Review 2, G3: a fence of another pool is refused, even when this pool recorded as many fences.
BOOST_AUTO_TEST_CASE(a_fence_of_another_pool_is_refused) {
    const std::size_t page = vmmpp::vmm_granularity(0);
    vmmpp::budget budget(16 * page);
    vmmpp::elastic_pool<vmmpp::elastic_page_config> a(8 * page, {}, {}, budget.register_model("a", 8 * page));
    vmmpp::elastic_pool<vmmpp::elastic_page_config> b(8 * page, {}, {}, budget.register_model("b", 8 * page));
    a.ensure_committed(0, page);
    std::memset(a.base(), 0x19, page);
    (void)a.record_fence(nullptr);  // a has a fence 1, complete
    queued_reads reads;
    fakecuda::hold_gpu(true);
    reads.read(a.base(), page);
    const auto foreign = b.record_fence(nullptr);  // b's fence 1, after the queued read
    BOOST_CHECK_THROW(a.release(0, page, foreign), vmmpp::invalid_argument);
    BOOST_TEST(a.stats().held_pages == 1u);
    fakecuda::run_gpu();
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x19) == 0u);
    fakecuda::hold_gpu(false);
    a.release(0, page);
}

BOOST_AUTO_TEST_SUITE_END()
