// The elastic pool on the host backing (CI runs these for real): the behaviour suite over every
// host configuration, the growth policies, several models on one budget, and concurrency.
#define BOOST_TEST_MODULE pool
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <atomic>
#include <cstring>
#include <thread>

#include "support/pool_factories.hpp"

using pool_configs = boost::mpl::list<vmmpp::host_config, vmmpp_test::host_chunked_budget_config,
                                      vmmpp_test::host_external_config, vmmpp_test::host_preallocated_config>;
#include "support/pool_suite.hpp"

using vmmpp_test::page;

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
                    try {
                        pool.ensure_committed(p * page + rng() % page, 1);
                        mine.push_back(p);
                        ++granted;
                    } catch (const vmmpp::over_quota&) {
                        ++refused;
                    }
                } else {
                    const std::size_t i2 = rng() % mine.size();
                    pool.release(mine[i2] * page, 1);
                    mine[i2] = mine.back();
                    mine.pop_back();
                }
                const auto s = budget.stats();
                if (s.committed > s.limit) {
                    throw std::logic_error("budget overshot");
                }
            }
            for (std::size_t p : mine) {
                pool.release(p * page, 1);
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
