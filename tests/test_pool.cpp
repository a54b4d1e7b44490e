// The elastic pool on the host backing (CI runs these for real): the behaviour suite over every
// host configuration, the growth policies, several models on one budget, and concurrency.
#define BOOST_TEST_MODULE pool
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "support/pool_factories.hpp"
#include "vmmpp/backing/fault_injecting.hpp"
#include "vmmpp/detail/backing_adaptor.hpp"

using pool_configs = boost::mpl::list<vmmpp::host_config, vmmpp_test::host_chunked_budget_config,
                                      vmmpp_test::host_external_config, vmmpp_test::host_preallocated_config,
                                      vmmpp_test::host_adaptive_config>;
#include "support/pool_suite.hpp"

using vmmpp_test::page;

// The background seam (vmmpp/pool/agent.hpp): which agent each kind of pool has.
template <class Config>
using agent_of = typename vmmpp::detail::pool_books<Config>::agent_type;
template <class Config>
using books_of = vmmpp::detail::pool_books<Config>;
static_assert(std::is_same_v<agent_of<vmmpp::host_config>, vmmpp::detail::release_agent_client<books_of<vmmpp::host_config>>>);
static_assert(std::is_same_v<agent_of<vmmpp_test::host_preallocated_config>,
                             vmmpp::detail::no_agent<books_of<vmmpp_test::host_preallocated_config>>>);
using host_single_thread = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::unlimited, vmmpp::null_mutex>;
static_assert(std::is_same_v<agent_of<host_single_thread>, vmmpp::detail::no_agent<books_of<host_single_thread>>>);
using host_mapped = vmmpp::pool_config<vmmpp::host, vmmpp::mapped_ahead<>, vmmpp::unlimited>;
static_assert(std::is_same_v<agent_of<host_mapped>, vmmpp::detail::mapper_agent<books_of<host_mapped>>>);

BOOST_AUTO_TEST_CASE(held_memory_keeps_its_bytes) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(8 * page);
    pool.ensure_committed(page, 3 * page);
    std::memset(pool.base() + page, 0x5a, 3 * page);
    pool.ensure_committed(2 * page, 10);  // a second hold on a held page changes nothing
    pool.release(page, 3 * page);
    BOOST_TEST(pool.committed_bytes() == page);  // only page 2 is still held
    BOOST_TEST(static_cast<int>(pool.base()[2 * page + 5]) == 0x5a);
}

BOOST_AUTO_TEST_CASE(page_granular_keeps_spares) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(16 * page, {}, vmmpp::page_granular{.spare_pages = 2});
    pool.ensure_committed(0, 6 * page);
    pool.release(0, 6 * page);
    BOOST_TEST(pool.committed_bytes() == 2 * page);
    BOOST_TEST(pool.stats().idle_units == 2u);
    BOOST_TEST(pool.is_committed(0, 2 * page));  // the lowest pages stay: highest go back first
    const auto commits = pool.stats().commits;
    pool.ensure_committed(0, page);  // served by a spare: no new commit
    BOOST_TEST(pool.stats().commits == commits);
    BOOST_TEST(pool.trim() == page);
    BOOST_TEST(pool.committed_bytes() == page);
}

BOOST_AUTO_TEST_CASE(chunked_commits_whole_chunks_and_keeps_a_low_watermark) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::chunked<4>, vmmpp::unlimited>;
    vmmpp::elastic_pool<config> pool(18 * page, {}, vmmpp::chunked<4>{.low_watermark_chunks = 1});
    BOOST_TEST(pool.unit_bytes() == 4 * page);
    pool.ensure_committed(5 * page, 1);
    BOOST_TEST(pool.committed_bytes() == 4 * page);
    BOOST_TEST(pool.is_committed(4 * page, 4 * page));
    pool.ensure_committed(17 * page, 1);  // the last chunk is short: 18 pages = 4 + 4 + 4 + 4 + 2
    BOOST_TEST(pool.committed_bytes() == 6 * page);
    BOOST_TEST(pool.stats().commits == 2u);
    pool.release(17 * page, 1);
    pool.release(5 * page, 1);
    BOOST_TEST(pool.committed_bytes() == 4 * page);  // one chunk kept: the low watermark
    BOOST_TEST(pool.trim() == 4 * page);
}

BOOST_AUTO_TEST_CASE(preallocated_commits_everything_up_front) {
    vmmpp::elastic_pool<vmmpp_test::host_preallocated_config> pool(8 * page);
    BOOST_TEST(pool.committed_bytes() == 8 * page);
    BOOST_TEST(pool.stats().commits == 1u);  // one unit: the whole span
    pool.ensure_committed(0, 100);
    pool.release(0, 100);
    BOOST_TEST(pool.trim() == 0u);
    BOOST_TEST(pool.committed_bytes() == 8 * page);
}

BOOST_AUTO_TEST_CASE(a_preallocated_pool_over_budget_fails_to_build_and_leaks_nothing) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::preallocated, vmmpp::shared_budget>;
    vmmpp::budget budget(4 * page);
    BOOST_CHECK_THROW((vmmpp::elastic_pool<config>(8 * page, {}, {}, budget.register_model("big", 8 * page))),
                      vmmpp::over_quota);
    BOOST_TEST(budget.stats().committed == 0u);
    BOOST_TEST(budget.stats().denied == 1u);
}

BOOST_AUTO_TEST_CASE(two_models_take_turns_on_one_budget) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget budget(16 * page);
    vmmpp::elastic_pool<config> a(32 * page, {}, {}, budget.register_model("a", 12 * page));
    vmmpp::elastic_pool<config> b(32 * page, {}, {}, budget.register_model("b", 16 * page));
    auto check_accounting = [&] {
        const auto s = budget.stats();
        BOOST_TEST(s.committed == a.committed_bytes() + b.committed_bytes());
        BOOST_TEST(s.models[0].committed == a.committed_bytes());
        BOOST_TEST(s.models[1].committed == b.committed_bytes());
        BOOST_TEST(s.models[0].committed <= s.models[0].limit);
        BOOST_TEST(s.models[1].committed <= s.models[1].limit);
        BOOST_TEST(s.committed <= s.limit);
    };
    // Model a bursts until its own limit stops it.
    std::size_t a_pages = 0;
    try {
        for (; a_pages < 32; ++a_pages) {
            a.ensure_committed(a_pages * page, page);
            check_accounting();
        }
    } catch (const vmmpp::over_quota& e) {
        BOOST_TEST(e.which() == "model a");
        BOOST_TEST(e.limit() == 12 * page);
        BOOST_TEST(e.in_use() == 12 * page);
    }
    BOOST_TEST(a_pages == 12u);
    check_accounting();
    // Model b gets only what the global limit leaves.
    std::size_t b_pages = 0;
    try {
        for (; b_pages < 32; ++b_pages) {
            b.ensure_committed(b_pages * page, page);
            check_accounting();
        }
    } catch (const vmmpp::over_quota& e) {
        BOOST_TEST(e.which() == "global");
        BOOST_TEST(e.requested() == page);
    }
    BOOST_TEST(b_pages == 4u);
    // A multi-page hold that does not fit is refused whole.
    BOOST_CHECK_THROW(b.ensure_committed(10 * page, 3 * page), vmmpp::over_quota);
    BOOST_TEST(b.committed_bytes() == 4 * page);
    check_accounting();
    // Model a frees everything; b bursts to its whole limit.
    for (std::size_t p = 0; p < a_pages; ++p) {
        a.release(p * page, page);
        check_accounting();
    }
    BOOST_TEST(a.committed_bytes() == 0u);
    for (; b_pages < 16; ++b_pages) {
        b.ensure_committed(b_pages * page, page);
        check_accounting();
    }
    BOOST_CHECK_THROW(b.ensure_committed(16 * page, 1), vmmpp::over_quota);
    const auto s = budget.stats();
    BOOST_TEST(s.peak == 16 * page);
    BOOST_TEST(s.models[1].peak == 16 * page);
    BOOST_TEST(s.models[0].peak == 12 * page);
    BOOST_TEST(s.models[0].denied == 1u);
    BOOST_TEST(s.denied == 4u);
    BOOST_CHECK_THROW((void)budget.register_model("a", page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)budget.register_model("zero", 0), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(spares_go_back_before_a_quota_refusal) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget budget(4 * page);
    vmmpp::elastic_pool<config> pool(16 * page, {}, vmmpp::page_granular{.spare_pages = 4},
                                     budget.register_model("m", 4 * page));
    pool.ensure_committed(0, 4 * page);
    pool.release(0, 3 * page);  // pages 0..2 stay as spares
    BOOST_TEST(pool.committed_bytes() == 4 * page);
    pool.ensure_committed(8 * page, 2 * page);  // needs 2 pages: the spares make room
    BOOST_TEST(pool.committed_bytes() <= 4 * page);
    BOOST_TEST(pool.is_committed(8 * page, 2 * page));
    BOOST_TEST(budget.stats().committed == pool.committed_bytes());
}

BOOST_AUTO_TEST_CASE(eight_threads_two_pools_one_budget) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    constexpr std::size_t pages = 64;
    vmmpp::budget budget(48 * page);
    vmmpp::elastic_pool<config> pools[2] = {
        vmmpp::elastic_pool<config>(pages * page, {.page_bytes = page}, {}, budget.register_model("x", 32 * page)),
        vmmpp::elastic_pool<config>(pages * page, {.page_bytes = page}, {}, budget.register_model("y", 32 * page))};
    std::atomic<std::size_t> granted{0}, refused{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&, t] {
            auto& pool = pools[t % 2];
            std::mt19937 rng(static_cast<unsigned>(t));
            const std::size_t first = (t / 2) * (pages / 4);  // 4 threads per pool, 16 pages each
            std::vector<std::size_t> mine;
            for (int i = 0; i < 2000; ++i) {
                if (mine.size() < 16 && (mine.empty() || rng() % 2 == 0)) {
                    const std::size_t p = first + rng() % (pages / 4);
                    const std::size_t at = p * page + rng() % page;
                    try {
                        pool.ensure_committed(at, 1);
                        mine.push_back(at);  // released as held: debug builds check it byte by byte
                        ++granted;
                    } catch (const vmmpp::over_quota&) {
                        ++refused;
                    }
                } else {
                    const std::size_t i2 = rng() % mine.size();
                    pool.release(mine[i2], 1);
                    mine[i2] = mine.back();
                    mine.pop_back();
                }
                const auto s = budget.stats();
                if (s.committed > s.limit) {
                    throw std::logic_error("budget overshot");
                }
            }
            for (std::size_t at : mine) {
                pool.release(at, 1);
            }
        });
    }
    for (auto& th : threads) {
        th.join();
    }
    BOOST_TEST_MESSAGE("granted " << granted << ", refused " << refused);
    BOOST_TEST(granted.load() > 0u);
    const auto s = budget.stats();
    BOOST_TEST(pools[0].committed_bytes() == 0u);
    BOOST_TEST(pools[1].committed_bytes() == 0u);
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.peak <= s.limit);
    BOOST_TEST(s.models[0].peak <= 32 * page);
    BOOST_TEST(pools[0].stats().held_pages + pools[1].stats().held_pages == 0u);
}

// --- regressions from the review of 007dd5d ---

// F11: two ranges on one page; releasing one of them twice used to consume the other's hold and
// decommit the page under it. Debug builds count holds per byte and refuse the second release.
BOOST_AUTO_TEST_CASE(double_release_is_refused_even_when_another_range_shares_the_page,
                     *boost::unit_test::precondition([](boost::unit_test::test_unit_id) {
                         return boost::test_tools::assertion_result(vmmpp::detail::debug_checks);
                     })) {
    vmmpp::elastic_pool<vmmpp::host_config> pool(4 * page);
    pool.ensure_committed(0, 100);    // A
    pool.ensure_committed(100, 100);  // B, on the same page
    pool.release(0, 100);
    BOOST_CHECK_THROW(pool.release(0, 100), vmmpp::invalid_argument);
    BOOST_TEST(pool.is_committed(100, 100));  // B's page stays
    BOOST_TEST(pool.stats().held_pages == 1u);
    std::memset(pool.base() + 100, 0x11, 100);  // and is still usable
    pool.release(100, 100);
    BOOST_TEST(pool.committed_bytes() == 0u);
    // Ranges may still be released in other pieces than they were held in.
    pool.ensure_committed(0, 2 * page);
    pool.release(0, page);
    pool.release(page, page);
    BOOST_TEST(pool.committed_bytes() == 0u);
}

// F12: a model whose pool is busy for a moment (its own thread holds its lock) used to be skipped
// by reclaim, so another model was refused with over_quota while idle spares sat in the budget.
BOOST_AUTO_TEST_CASE(reclaim_waits_for_a_pool_busy_for_a_moment) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    constexpr std::size_t small = 64 << 10;
    vmmpp::budget budget(8 * small);
    vmmpp::elastic_pool<config> spender(16 * small, {.page_bytes = small}, vmmpp::page_granular{.spare_pages = 8},
                                        budget.register_model("spender", 8 * small));
    spender.ensure_committed(0, 8 * small);
    spender.release(0, 8 * small);  // 8 idle spares, charged: the budget is full
    vmmpp::elastic_pool<config> needy(16 * small, {.page_bytes = small}, {}, budget.register_model("needy", 8 * small));
    std::atomic<bool> locked{false};
    std::thread busy([&] {
        spender.with_backing([&](const vmmpp::host&) {
            locked = true;
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
            return 0;
        });
    });
    while (!locked) {
        std::this_thread::yield();
    }
    BOOST_CHECK_NO_THROW(needy.ensure_committed(0, small));
    busy.join();
    BOOST_TEST(spender.stats().reclaims == 1u);
    BOOST_TEST(budget.stats().committed == spender.stats().charged + needy.stats().charged);
}

// Failure containment: a decommit the backing refuses is never dropped silently. Refused with
// nothing given back, the unit stays a committed spare and is tried again; refused half done (an
// unmap went through, the release of the handle did not), the unit is retired: still charged,
// never mapped, handed out or given back again.
namespace {
enum class decommit_outcome { works, refused, half_done, always_refused };
std::atomic<decommit_outcome> next_decommit{decommit_outcome::works};
std::atomic<int> decommit_calls{0};
struct refusing_host : vmmpp::detail::backing_adaptor<vmmpp::host> {
    using options = vmmpp::host_options;
    explicit refusing_host(std::size_t capacity, options o = {}) : backing_adaptor(capacity, o) {}
    void commit(std::size_t offset, std::size_t bytes) { upstream_.commit(offset, bytes); }
    void decommit(std::size_t offset, std::size_t bytes) {
        ++decommit_calls;
        decommit_outcome outcome = next_decommit.load();
        if (outcome != decommit_outcome::always_refused) {
            outcome = next_decommit.exchange(decommit_outcome::works);
        }
        switch (outcome) {
        case decommit_outcome::works:
            upstream_.decommit(offset, bytes);
            return;
        case decommit_outcome::refused:
        case decommit_outcome::always_refused:
            throw vmmpp::cuda_error("cuMemUnmap", 1, "CUDA_ERROR_INVALID_VALUE", "injected");
        case decommit_outcome::half_done:
            upstream_.decommit(offset, bytes);
            throw vmmpp::cuda_error("cuMemRelease", 1, "CUDA_ERROR_INVALID_VALUE", "injected");
        }
    }
    friend constexpr void get_property(const refusing_host&, vmmpp::host_accessible) noexcept {}
};
static_assert(vmmpp::backing<refusing_host>);
} // namespace

// Room made for a commit under quota pressure tries each spare once: one the backing refuses to
// give back is a spare again, and is not tried again (and again) in the same call.
BOOST_AUTO_TEST_CASE(room_made_for_a_commit_tries_each_refusing_spare_once) {
    using config = vmmpp::pool_config<refusing_host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget budget(4 * page);
    vmmpp::elastic_pool<config> pool(8 * page, {}, vmmpp::page_granular{.spare_pages = 4},
                                     budget.register_model("m", 4 * page));
    pool.ensure_committed(0, 4 * page);
    pool.release(page, 3 * page);  // three spares, kept
    BOOST_TEST(pool.stats().idle_units == 3u);

    next_decommit = decommit_outcome::always_refused;
    decommit_calls = 0;
    BOOST_CHECK_THROW(pool.ensure_committed(4 * page, page), vmmpp::over_quota);
    next_decommit = decommit_outcome::works;
    BOOST_TEST(decommit_calls.load() == 3);
    const auto s = pool.stats();
    BOOST_TEST(s.decommit_failures == 3u);
    BOOST_TEST(s.idle_units == 3u);  // spares again, still charged
    BOOST_TEST(s.charged == 4 * page);

    pool.ensure_committed(4 * page, page);  // the backing agrees now: room is made
    BOOST_TEST(pool.stats().held_pages == 2u);
    BOOST_TEST(budget.stats().committed <= 4 * page);
}

BOOST_AUTO_TEST_CASE(a_refused_decommit_keeps_the_unit_and_a_half_done_one_retires_it) {
    using config = vmmpp::pool_config<refusing_host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget budget(16 * page);
    vmmpp::elastic_pool<config> pool(8 * page, {}, {}, budget.register_model("m", 16 * page));
    pool.ensure_committed(0, 3 * page);
    std::memset(pool.base(), 0x42, 3 * page);

    next_decommit = decommit_outcome::refused;
    BOOST_CHECK_THROW(pool.release(2 * page, page), vmmpp::cuda_error);
    auto s = pool.stats();
    BOOST_TEST(s.decommit_failures == 1u);
    BOOST_TEST(s.retired_units == 0u);
    BOOST_TEST(s.idle_units == 1u);  // a spare, still committed and charged
    BOOST_TEST(pool.is_committed(2 * page, page));
    BOOST_TEST(budget.stats().committed == 3 * page);
    pool.ensure_committed(2 * page, page);  // usable: its bytes are still there
    BOOST_TEST(static_cast<int>(pool.base()[2 * page + 7]) == 0x42);
    pool.release(2 * page, page);  // and it goes back once the backing agrees
    BOOST_TEST(budget.stats().committed == 2 * page);

    next_decommit = decommit_outcome::half_done;
    BOOST_CHECK_THROW(pool.release(page, page), vmmpp::cuda_error);
    s = pool.stats();
    BOOST_TEST(s.decommit_failures == 2u);
    BOOST_TEST(s.retired_units == 1u);
    BOOST_TEST(s.retired_bytes == page);
    BOOST_TEST(s.idle_units == 0u);
    BOOST_TEST(s.committed == page);                      // unit 0 only
    BOOST_TEST(budget.stats().committed == 2 * page);     // the retired unit stays charged
    BOOST_CHECK_THROW(pool.ensure_committed(page + 10, 1), vmmpp::retired_memory);
    BOOST_CHECK_THROW(pool.ensure_committed(0, 2 * page), vmmpp::retired_memory);
    BOOST_TEST(pool.stats().held_pages == 1u);            // the refusals changed nothing
    BOOST_TEST(pool.trim() == 0u);                         // never given back again
    pool.ensure_committed(3 * page, page);                 // the rest of the pool works
    pool.release(3 * page, page);
    pool.release(0, page);
    BOOST_TEST(pool.committed_bytes() == 0u);
    BOOST_TEST(budget.stats().committed == page);         // the retired unit
}

// --- adaptive_extents: commits that grow while the pool grows fast, memory that goes back whole ---

namespace {
using adaptive_host = vmmpp::pool_config<vmmpp::host, vmmpp::adaptive_extents, vmmpp::unlimited>;
/// Any growth faster than a byte per second is fast: extents double deterministically, up to 8 pages.
constexpr vmmpp::adaptive_extents bursting{.max_extent_pages = 8, .fast_growth_bytes_per_second = 1, .spare_pages = 0};
} // namespace

BOOST_AUTO_TEST_CASE(extent_sizes_double_while_growth_is_fast_and_halve_as_it_slows) {
    using clock = std::chrono::steady_clock;
    using std::chrono::microseconds;
    // Units of 1 MB, fast growth 1 GB/s: one unit per millisecond.
    vmmpp::detail::extent_sizer<clock> sizer(8, 1'000'000, 1'000'000'000);
    const auto t0 = clock::time_point{} + std::chrono::hours(1);
    BOOST_TEST(sizer.size_at(t0) == 1u);  // the first commit
    sizer.committed(t0);
    auto t = t0;
    std::size_t sizes[5];
    for (std::size_t& size : sizes) {
        t += microseconds(100);  // ten times the fast rate
        size = sizer.size_at(t);
        sizer.committed(t);
    }
    BOOST_TEST(sizes[0] == 2u);
    BOOST_TEST(sizes[1] == 4u);
    BOOST_TEST(sizes[2] == 8u);
    BOOST_TEST(sizes[4] == 8u);  // at most max_extent
    // 8 units used up in 8 ms: the fast rate, doubling (capped); in 12 ms: above half, kept.
    BOOST_TEST(sizer.size_at(t + microseconds(8'000)) == 8u);
    BOOST_TEST(sizer.size_at(t + microseconds(12'000)) == 8u);
    BOOST_TEST(sizer.size_at(t + microseconds(20'000)) == 4u);   // 0.4 GB/s: halved
    BOOST_TEST(sizer.size_at(t + microseconds(40'000)) == 2u);   // 0.2 GB/s: twice
    BOOST_TEST(sizer.size_at(t + std::chrono::hours(1)) == 1u);  // a long quiet: one unit again
    BOOST_TEST(sizer.current() == 8u);                           // asking changed nothing
    sizer.gave_back();  // churn, not growth: one unit again, then doubling from there
    BOOST_TEST(sizer.size_at(t + microseconds(100)) == 1u);
    sizer.committed(t + microseconds(100));
    BOOST_TEST(sizer.size_at(t + microseconds(200)) == 2u);
    vmmpp::detail::extent_sizer<clock> off(8, 1'000'000, 0);
    off.committed(t0);
    BOOST_TEST(off.size_at(t0 + microseconds(1)) == 1u);  // no fast rate: always one
}

BOOST_AUTO_TEST_CASE(adaptive_extents_grow_ahead_in_a_burst_and_go_back_whole) {
    vmmpp::elastic_pool<adaptive_host> pool(64 * page, {}, bursting);
    pool.ensure_committed(0, page);  // [0]
    BOOST_TEST(pool.committed_bytes() == page);
    pool.ensure_committed(page, page);  // [1, 2]: page 2 ahead of demand
    BOOST_TEST(pool.committed_bytes() == 3 * page);
    BOOST_TEST(pool.stats().idle_units == 1u);
    pool.ensure_committed(2 * page, page);  // a spare: no commit
    BOOST_TEST(pool.stats().commits == 2u);
    pool.ensure_committed(3 * page, page);   // [3, 6]
    pool.ensure_committed(7 * page, page);   // [7, 14]
    pool.ensure_committed(15 * page, page);  // [15, 22]: at most 8
    BOOST_TEST(pool.committed_bytes() == 23 * page);
    BOOST_TEST(pool.stats().commits == 5u);
    BOOST_TEST(pool.stats().held_pages == 6u);
    std::memset(pool.base(), 7, 23 * page);  // all of it is usable memory

    pool.release(15 * page, page);  // [15, 22] is idle as a whole: back at once
    BOOST_TEST(pool.committed_bytes() == 15 * page);
    pool.release(page, page);  // [1, 2]: page 2 is still held, so both stay
    BOOST_TEST(pool.committed_bytes() == 15 * page);
    BOOST_TEST(pool.is_committed(page, page));
    pool.release(2 * page, page);
    BOOST_TEST(pool.committed_bytes() == 13 * page);
    BOOST_TEST(!pool.is_committed(page, 2 * page));
    pool.release(7 * page, page);
    pool.release(3 * page, page);
    pool.release(0, page);
    BOOST_TEST(pool.committed_bytes() == 0u);
    BOOST_TEST(pool.stats().decommits == 5u);  // one per extent
}

BOOST_AUTO_TEST_CASE(adaptive_extents_keep_spares_in_whole_extents) {
    vmmpp::adaptive_extents growth = bursting;
    growth.spare_pages = 4;
    vmmpp::elastic_pool<adaptive_host> pool(64 * page, {}, growth);
    for (std::size_t p = 0; p < 15; ++p) {
        pool.ensure_committed(p * page, page);  // extents [0] [1,2] [3,6] [7,14]
    }
    pool.release(7 * page, 8 * page);  // [7, 14] idle: 8 idle pages > 4 spares, and it goes whole
    BOOST_TEST(pool.committed_bytes() == 7 * page);
    pool.release(3 * page, 4 * page);  // [3, 6] idle: 4 spares may stay
    BOOST_TEST(pool.committed_bytes() == 7 * page);
    BOOST_TEST(pool.stats().idle_units == 4u);
    BOOST_TEST(pool.trim() == 4 * page);
}

BOOST_AUTO_TEST_CASE(an_extent_the_quota_cannot_take_shrinks_to_what_is_needed) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::adaptive_extents, vmmpp::shared_budget>;
    vmmpp::budget budget(5 * page);
    vmmpp::elastic_pool<config> pool(64 * page, {}, bursting, budget.register_model("m", 5 * page));
    pool.ensure_committed(0, page);     // [0]
    pool.ensure_committed(page, page);  // [1, 2]
    pool.ensure_committed(3 * page, page);  // wants [3, 6]: 4 pages, 2 left under the limit: [3] alone
    BOOST_TEST(pool.committed_bytes() == 4 * page);
    BOOST_TEST(budget.stats().committed == 4 * page);
    pool.ensure_committed(4 * page, page);
    BOOST_CHECK_THROW(pool.ensure_committed(5 * page, page), vmmpp::over_quota);  // a real refusal
    BOOST_TEST(pool.committed_bytes() == 5 * page);
}

BOOST_AUTO_TEST_CASE(a_failed_extent_rolls_back_the_whole_hold) {
    using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::adaptive_extents, vmmpp::unlimited>;
    vmmpp::elastic_pool<config> pool(64 * page, vmmpp::fault_injecting_options<vmmpp::host>{.byte_limit = 4 * page},
                                     bursting);
    pool.ensure_committed(2 * page, page);  // [2]
    // [0, 1] fits; then [3, 6] ahead of demand does not, nor does [3, 4] alone: all of it undone.
    BOOST_CHECK_THROW(pool.ensure_committed(0, 5 * page), vmmpp::out_of_memory);
    BOOST_TEST(pool.committed_bytes() == page);
    BOOST_TEST(pool.stats().held_pages == 1u);
    BOOST_TEST(pool.stats().idle_units == 0u);
    BOOST_TEST(pool.backing().committed_bytes() == page);
    pool.ensure_committed(0, 2 * page);  // within the limit: [0, 1]
    BOOST_TEST(pool.committed_bytes() == 3 * page);
    pool.release(0, 2 * page);
    pool.release(2 * page, page);
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(random_holds_on_adaptive_extents_keep_held_pages_committed_and_give_all_back) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::adaptive_extents, vmmpp::shared_budget>;
    constexpr std::size_t pages = 256;
    vmmpp::budget budget(pages * page);
    // 2 MiB pages: 10 GB/s is one page per 200 us, so the quiet spells below halve the extents.
    vmmpp::adaptive_extents growth{.max_extent_pages = 16, .fast_growth_bytes_per_second = 10'000'000'000, .spare_pages = 3};
    vmmpp::elastic_pool<config> pool(pages * page, {}, growth, budget.register_model("m", pages * page));
    std::mt19937_64 rng(12345);
    std::vector<std::pair<std::size_t, std::size_t>> held;  // ranges, in pages
    std::vector<unsigned> holds(pages, 0);
    for (int step = 0; step < 20000; ++step) {
        if (held.empty() || rng() % 100 < 55) {
            const std::size_t first = rng() % pages;
            const std::size_t n = 1 + rng() % std::min<std::size_t>(6, pages - first);
            pool.ensure_committed(first * page, n * page);
            held.emplace_back(first, n);
            for (std::size_t p = first; p < first + n; ++p) {
                ++holds[p];
            }
        } else {
            const std::size_t i = rng() % held.size();
            const auto [first, n] = held[i];
            held[i] = held.back();
            held.pop_back();
            pool.release(first * page, n * page);
            for (std::size_t p = first; p < first + n; ++p) {
                --holds[p];
            }
        }
        if (step % 97 == 0) {
            std::this_thread::sleep_for(std::chrono::microseconds(300));  // quiet spells: extents shrink again
        }
        std::size_t held_pages = 0;
        for (std::size_t p = 0; p < pages; ++p) {
            if (holds[p] > 0) {
                ++held_pages;
                BOOST_REQUIRE(pool.is_committed(p * page, page));
            }
        }
        const auto s = pool.stats();
        BOOST_REQUIRE(s.held_pages == held_pages);
        BOOST_REQUIRE(s.committed == (held_pages + s.idle_units) * page);
        BOOST_REQUIRE(budget.stats().committed == s.committed);
    }
    for (const auto& [first, n] : held) {
        pool.release(first * page, n * page);
    }
    (void)pool.trim();
    BOOST_TEST(pool.committed_bytes() == 0u);
    BOOST_TEST(budget.stats().committed == 0u);
}

BOOST_AUTO_TEST_CASE(the_mapper_maps_extents_ahead_and_gives_them_back) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::mapped_ahead<vmmpp::adaptive_extents>, vmmpp::unlimited>;
    vmmpp::mapped_ahead<vmmpp::adaptive_extents> growth{.inner = bursting};
    growth.low_watermark = 2;
    growth.high_watermark = 6;
    growth.release_delay = std::chrono::milliseconds(20);
    vmmpp::elastic_pool<config> pool(128 * page, {}, growth);
    for (std::size_t p = 0; p < 40; ++p) {
        pool.ensure_committed(p * page, page);
    }
    const auto s = pool.stats();
    BOOST_TEST(s.commits < 40u);  // extents, by the caller or the mapper
    BOOST_TEST(s.held_pages == 40u);
    pool.release(0, 40 * page);
    for (int i = 0; i < 2000 && pool.stats().idle_units > 6; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    BOOST_TEST(pool.stats().idle_units <= 14u);  // above the high watermark only what an extent still pins
    (void)pool.trim();
    BOOST_TEST(pool.committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(errors_with_no_limit_say_so_rather_than_limit_0) {
    // An unlimited pool's backing reports 0 for "no limit" (a failed mmap, a cudaMalloc refused).
    const vmmpp::out_of_memory none("host address space (mmap: Cannot allocate memory)", 4096, 0, 0);
    BOOST_TEST(std::string(none.what()) ==
               "out of memory (host address space (mmap: Cannot allocate memory)): requested 4096 bytes with 0 bytes "
               "committed, no limit");
    BOOST_TEST(none.limit() == 0u);
    const vmmpp::out_of_memory capped("device 0 physical memory (cuMemCreate)", 2, 4, 6);
    BOOST_TEST(std::string(capped.what()).ends_with("requested 2 bytes with 4 bytes committed, limit 6 bytes"));
    const vmmpp::over_quota quota_none("model m", 2, 4, 0);
    BOOST_TEST(std::string(quota_none.what()) == "over quota (model m): requested 2 bytes with 4 bytes in use, no limit");
}

// Issue 30: a batch of ranges held in one call (kv_cache's append: a prompt's layer_major
// pieces, sorted) counts holds per page exactly as one call per range does: a page under k of
// them is held k times, whether the pieces are of one block or of several, and goes back only
// with its last release, one range at a time or in one batch.
BOOST_AUTO_TEST_CASE(a_batched_hold_counts_holds_per_page_as_one_hold_per_range) {
    constexpr std::size_t q = page / 4;
    constexpr std::size_t pages = 8;
    // Four pieces on page 0 (two of them the same range: the pool counts, it does not care),
    // one across pages 1 and 2 that runs into one on page 2, and page 5 whole.
    const std::vector<vmmpp::byte_range> pieces{{0, q},           {q, q},  {q, q}, {3 * q, q}, {page + 3 * q, 2 * q},
                                                {2 * page + q, q}, {5 * page, page}};
    std::vector<unsigned> holds(pages, 0);  // the reference: holds per page
    const auto count = [&](const vmmpp::byte_range& r, int by) {
        for (std::size_t p = r.offset / page; p <= (r.offset + r.bytes - 1) / page; ++p) {
            holds[p] += by;
        }
    };
    const auto held_pages = [&] { return static_cast<std::size_t>(std::count_if(holds.begin(), holds.end(), [](unsigned h) { return h > 0; })); };
    vmmpp::elastic_pool<vmmpp::host_config> batched(pages * page);
    vmmpp::elastic_pool<vmmpp::host_config> one_by_one(pages * page);
    batched.ensure_committed(pieces);
    for (const auto& r : pieces) {
        one_by_one.ensure_committed(r.offset, r.bytes);
        count(r, 1);
    }
    BOOST_TEST(holds[0] == 4u);
    BOOST_TEST(holds[2] == 2u);
    BOOST_TEST(batched.stats().held_pages == held_pages());
    BOOST_TEST(batched.committed_bytes() == one_by_one.committed_bytes());
    // Released one range at a time in another order: every page stays committed while it has
    // a hold left, in both pools alike.
    for (std::size_t i : {2u, 6u, 0u, 4u, 1u, 5u, 3u}) {
        batched.release(pieces[i].offset, pieces[i].bytes);
        one_by_one.release(pieces[i].offset, pieces[i].bytes);
        count(pieces[i], -1);
        BOOST_TEST(batched.stats().held_pages == held_pages());
        BOOST_TEST(one_by_one.stats().held_pages == held_pages());
        for (std::size_t p = 0; p < pages; ++p) {
            BOOST_TEST(batched.is_committed(p * page, page) == (holds[p] > 0), "page " << p);
        }
    }
    BOOST_TEST(batched.committed_bytes() == 0u);
    BOOST_CHECK_THROW(batched.release(0, q), vmmpp::invalid_argument);  // no hold left: refused in every build
    // Over a hold from before, held and released as one batch each: the hold from before stays.
    batched.ensure_committed(0, page);
    batched.ensure_committed(pieces);
    batched.release(pieces, vmmpp::pool_fence{});
    BOOST_TEST(batched.stats().held_pages == 1u);
    BOOST_TEST(batched.is_committed(0, page));
    batched.release(0, page);
    BOOST_TEST(batched.committed_bytes() == 0u);
    // In any order: the batch need not be sorted (unsorted ranges are runs of their own).
    const std::vector<vmmpp::byte_range> reversed(pieces.rbegin(), pieces.rend());
    batched.ensure_committed(reversed);
    BOOST_TEST(batched.stats().held_pages == 4u);
    batched.release(pieces, vmmpp::pool_fence{});
    BOOST_TEST(batched.committed_bytes() == 0u);
}
