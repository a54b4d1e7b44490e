// The background mapper (mapped_ahead) and kept-handle accounting, on the host backing so CI
// runs them for real: spares ahead of demand, lazy release, no double map under a stress of
// several caches, budget pressure, exact accounting, clean shutdown.
#define BOOST_TEST_MODULE mapper
#include "support/cpu_main.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <limits>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "support/pool_factories.hpp"
#include "vmmpp/detail/backing_adaptor.hpp"
#include "vmmpp/kv/cache.hpp"

using vmmpp_test::page;
using namespace std::chrono_literals;

namespace {

/// The host backing, failing the test run if anything commits a range twice or decommits one
/// that is not committed: the mapper and callers must never map the same unit twice.
std::atomic<int> double_maps{0};
struct checked_host : vmmpp::detail::backing_adaptor<vmmpp::host> {
    using options = vmmpp::host_options;
    explicit checked_host(std::size_t capacity, options o = {}) : backing_adaptor(capacity, o) {}
    void commit(std::size_t offset, std::size_t bytes) { counting_misuse([&] { upstream_.commit(offset, bytes); }); }
    void decommit(std::size_t offset, std::size_t bytes) { counting_misuse([&] { upstream_.decommit(offset, bytes); }); }
    friend constexpr void get_property(const checked_host&, vmmpp::host_accessible) noexcept {}

private:
    template <class F>
    static void counting_misuse(F&& f) {
        try {
            f();
        } catch (const vmmpp::invalid_argument&) {
            ++double_maps;
            throw;
        }
    }
};
static_assert(vmmpp::backing<checked_host>);

/// The host backing with a vmm-like handle cache: a decommit keeps up to `max_kept` units'
/// bytes "allocated" (counted only), a commit reuses them. Exercises the pool's exact charging
/// of kept handles without a GPU.
struct keeping_host_options {
    std::size_t max_kept = 0;
};
struct keeping_host : vmmpp::detail::backing_adaptor<vmmpp::host> {
    using options = keeping_host_options;
    keeping_host(std::size_t capacity, options o) : backing_adaptor(capacity), max_kept(o.max_kept) {}
    void commit(std::size_t offset, std::size_t bytes) {
        upstream_.commit(offset, bytes);
        if (!kept.empty() && kept.back() == bytes) {
            kept.pop_back();
        }
    }
    void decommit(std::size_t offset, std::size_t bytes) {
        upstream_.decommit(offset, bytes);
        if (kept.size() < max_kept) {
            kept.push_back(bytes);
        }
    }
    [[nodiscard]] std::size_t cached_bytes() const noexcept {
        return std::accumulate(kept.begin(), kept.end(), std::size_t{0});
    }
    std::size_t release_cached() noexcept {
        const std::size_t b = cached_bytes();
        kept.clear();
        return b;
    }
    friend constexpr void get_property(const keeping_host&, vmmpp::host_accessible) noexcept {}
    std::size_t max_kept;
    std::vector<std::size_t> kept;
};
static_assert(vmmpp::backing<keeping_host>);

using mapped = vmmpp::mapped_ahead<vmmpp::page_granular>;
using mapped_config = vmmpp::pool_config<checked_host, mapped, vmmpp::shared_budget>;
using mapped_pool = vmmpp::elastic_pool<mapped_config>;
static_assert(mapped_pool::has_mapper);
static_assert(!vmmpp::elastic_pool<vmmpp::host_config>::has_mapper);

/// Polls `done` until it holds or 10 s pass; true if it held.
bool eventually(const std::function<bool()>& done) {
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (!done()) {
        if (std::chrono::steady_clock::now() > give_up) {
            return false;
        }
        std::this_thread::sleep_for(200us);
    }
    return true;
}

mapped make_mapped(std::size_t low, std::size_t high, std::chrono::milliseconds delay) {
    mapped g;
    g.low_watermark = low;
    g.high_watermark = high;
    g.release_delay = delay;
    return g;
}

} // namespace

BOOST_AUTO_TEST_CASE(watermarks_are_checked) {
    vmmpp::budget b(64 * page);
    BOOST_CHECK_THROW(mapped_pool(16 * page, {}, make_mapped(4, 2, 10ms), b.register_model("m", 64 * page)),
                      vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(spares_are_mapped_ahead_and_holds_find_them_committed) {
    vmmpp::budget b(64 * page);
    mapped_pool pool(32 * page, {}, make_mapped(2, 4, 10s), b.register_model("m", 64 * page));
    pool.will_need(0, 1);
    BOOST_TEST(eventually([&] { return pool.stats().idle_units == 4; }));
    BOOST_TEST(pool.is_committed(0, 4 * page));  // from the announced unit on
    // A steady stream of holds, one page at a time, each after the mapper caught up: no hold
    // ever commits on the caller's thread.
    for (std::size_t p = 0; p < 20; ++p) {
        pool.ensure_committed(p * page, page);
        BOOST_TEST_REQUIRE(eventually([&] {
            const auto s = pool.stats();
            return s.idle_units >= 2;
        }));
    }
    // Accounting is exact once no unit is in flight (the mapper may still be refilling here):
    // quota charge, budget, pool and backing agree.
    BOOST_TEST(eventually([&] {
        const auto s = pool.stats();
        return s.charged == s.committed && b.stats().committed == s.charged &&
               pool.with_backing([](const checked_host& h) { return h.committed_bytes(); }) == s.committed;
    }));
    const auto s = pool.stats();
    BOOST_TEST(s.sync_commits == 0u);
    BOOST_TEST(s.mapper_commits >= 22u);
    BOOST_TEST(s.held_pages == 20u);
    BOOST_TEST(double_maps == 0);
}

BOOST_AUTO_TEST_CASE(releases_never_call_the_backing_on_the_caller_thread_and_go_back_after_the_delay) {
    vmmpp::budget b(64 * page);
    mapped_pool pool(32 * page, {}, make_mapped(0, 3, 50ms), b.register_model("m", 64 * page));
    pool.ensure_committed(0, 12 * page);
    BOOST_TEST(pool.stats().sync_commits == 12u);
    pool.release(0, 12 * page);
    BOOST_TEST(pool.stats().decommits == 0u);  // nothing given back on this thread
    // 12, and up to the high watermark mapped ahead after the caller's own commit
    BOOST_TEST(pool.committed_bytes() >= 12 * page);
    BOOST_TEST(pool.committed_bytes() <= 15 * page);
    BOOST_TEST(eventually([&] { return pool.committed_bytes() == 3 * page; }));
    std::this_thread::sleep_for(100ms);
    const auto s = pool.stats();
    BOOST_TEST(s.committed == 3 * page);  // the high watermark stays
    // 9, and the units the mapper mapped ahead of the caller's own commit if it got to them first
    BOOST_TEST(s.mapper_decommits >= 9u);
    BOOST_TEST(b.stats().committed == 3 * page);
    BOOST_TEST(pool.trim() == 3 * page);
    BOOST_TEST(b.stats().committed == 0u);
}

BOOST_AUTO_TEST_CASE(budget_pressure_takes_other_models_spares_first) {
    vmmpp::budget b(10 * page);
    mapped_pool spender(32 * page, {}, make_mapped(4, 8, 10s), b.register_model("spender", 10 * page));
    spender.will_need(0, 1);
    BOOST_TEST(eventually([&] { return spender.stats().idle_units == 8; }));
    BOOST_TEST(b.stats().committed == 8 * page);
    vmmpp::elastic_pool<vmmpp_test::host_chunked_budget_config> needy(32 * page, {}, {},
                                                                      b.register_model("needy", 10 * page));
    needy.ensure_committed(0, 1);  // a 4-page chunk: only 2 pages free until the spender gives back
    BOOST_TEST(needy.committed_bytes() == 4 * page);
    BOOST_TEST(spender.stats().reclaims == 1u);
    BOOST_TEST(spender.committed_bytes() == 0u);
    BOOST_TEST(b.stats().committed == 4 * page);
    // Spares never push other memory out: the spender's mapper is refused, not the needy pool.
    spender.ensure_committed(0, page);
    BOOST_TEST(eventually([&] { return spender.stats().mapper_failures >= 1; }));
    BOOST_TEST(b.stats().committed <= 10 * page);
    BOOST_TEST(needy.committed_bytes() == 4 * page);
}

BOOST_AUTO_TEST_CASE(shutdown_joins_the_mapper_with_everything_accounted) {
    vmmpp::budget b(256 * page);
    for (int round = 0; round < 20; ++round) {
        mapped_pool pool(128 * page, {}, make_mapped(8, 64, 1ms), b.register_model("m" + std::to_string(round), 256 * page));
        pool.will_need(0, 1);  // the mapper is busy mapping 64 units while the pool goes
        pool.ensure_committed(0, 3 * page);
    }
    BOOST_TEST(b.stats().committed == 0u);
    BOOST_TEST(double_maps == 0);
}

BOOST_AUTO_TEST_CASE(kept_handles_are_charged_exactly_and_dropped_under_pressure) {
    using config = vmmpp::pool_config<keeping_host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget b(8 * page);
    {
        vmmpp::elastic_pool<config> pool(32 * page, keeping_host_options{.max_kept = 2}, {},
                                         b.register_model("keeper", 8 * page));
        pool.ensure_committed(0, 4 * page);
        pool.release(0, 4 * page);
        auto s = pool.stats();
        BOOST_TEST(s.committed == 0u);
        BOOST_TEST(s.cached_bytes == 2 * page);
        BOOST_TEST(s.charged == 2 * page);
        BOOST_TEST(b.stats().committed == 2 * page);  // kept handles occupy memory: charged
        pool.ensure_committed(0, page);  // reuses a kept handle: no new charge
        s = pool.stats();
        BOOST_TEST(s.cached_bytes == page);
        BOOST_TEST(b.stats().committed == 2 * page);
        pool.ensure_committed(page, 7 * page);  // needs all 8: the kept handle must go first
        s = pool.stats();
        BOOST_TEST(s.committed == 8 * page);
        BOOST_TEST(s.cached_bytes == 0u);
        BOOST_TEST(b.stats().committed == 8 * page);
        pool.release(0, 8 * page);
        BOOST_TEST(pool.stats().charged == 2 * page);
        BOOST_TEST(pool.trim() == 2 * page);
        pool.ensure_committed(0, page);
        pool.release(0, page);
        BOOST_TEST(b.stats().committed == page);
    }
    BOOST_TEST(b.stats().committed == 0u);  // the kept handle went back with the pool
}

BOOST_AUTO_TEST_CASE(several_mapped_caches_under_stress_never_map_twice_and_account_exactly) {
    // Four caches on one budget, each driven by its own thread with random appends, forks and
    // frees; every cache maps ahead in the background and reclaims from the others under
    // pressure. Invariants: no range is ever committed twice, the budget is never exceeded,
    // every block a sequence holds is committed, and everything comes back at the end.
    const vmmpp::kv_geometry g{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                               .block_tokens = 16, .max_blocks = 2048};
    using cache = vmmpp::kv_cache<mapped_config, vmmpp::block_major>;
    constexpr std::size_t limit = 24 * page;
    vmmpp::budget b(limit);
    const unsigned seed = std::random_device{}();
    BOOST_TEST_MESSAGE("seed " << seed);
    std::atomic<bool> failed{false};
    std::atomic<std::uint64_t> ops{0};
    {
        std::vector<std::unique_ptr<cache>> caches;
        for (int i = 0; i < 4; ++i) {
            caches.push_back(std::make_unique<cache>(g, checked_host::options{}, make_mapped(1, 4, 2ms),
                                                     b.register_model("c" + std::to_string(i), limit)));
        }
        std::vector<std::thread> threads;
        for (int i = 0; i < 4; ++i) {
            threads.emplace_back([&, i] {
                std::mt19937_64 rng(seed + static_cast<unsigned>(i));
                cache& c = *caches[static_cast<std::size_t>(i)];
                std::vector<vmmpp::seq_id> live;
                for (int step = 0; step < 3000 && !failed; ++step) {
                    try {
                        const auto r = rng() % 10;
                        if (live.empty() || r < 5) {
                            if (live.empty() || r == 0) {
                                live.push_back(c.add_sequence());
                            }
                            c.append(live[rng() % live.size()], 1 + rng() % 40);
                        } else if (r < 7) {
                            live.push_back(c.fork(live[rng() % live.size()]));
                        } else {
                            const std::size_t k = rng() % live.size();
                            c.free(live[k]);
                            live[k] = live.back();
                            live.pop_back();
                        }
                    } catch (const vmmpp::over_quota&) {
                    } catch (const vmmpp::out_of_blocks&) {
                    } catch (const std::exception& e) {
                        BOOST_ERROR("thread " << i << " step " << step << ": " << e.what());
                        failed = true;
                    }
                    for (vmmpp::seq_id s : live) {
                        for (std::int32_t blk : c.block_table(s)) {
                            const auto off = static_cast<std::size_t>(blk) * g.block_bytes();
                            if (!c.pool().is_committed(off, g.block_bytes())) {
                                BOOST_ERROR("thread " << i << ": block " << blk << " is held but not committed");
                                failed = true;
                            }
                        }
                    }
                    if (b.stats().committed > limit) {
                        BOOST_ERROR("budget exceeded");
                        failed = true;
                    }
                    ++ops;
                }
                for (vmmpp::seq_id s : live) {
                    c.free(s);
                }
            });
        }
        for (auto& t : threads) {
            t.join();
        }
        // Once the mappers settle (lazy releases done), the budget equals what the pools charge.
        const auto settled = [&] {
            std::size_t charged = 0;
            for (const auto& c : caches) {
                const auto s = c->pool().stats();
                if (s.idle_units > 4 || s.held_pages != 0) {
                    return false;
                }
                charged += s.charged;
            }
            return b.stats().committed == charged;
        };
        BOOST_TEST(eventually(settled));
    }
    BOOST_TEST(!failed);
    BOOST_TEST(double_maps == 0);
    BOOST_TEST(b.stats().committed == 0u);
    BOOST_TEST_MESSAGE(ops.load() << " operations");
}

// --- regressions from the review of 007dd5d ---

// F5: the mapper's search for the next unit to map ran high_watermark x frontiers steps under the
// pool's lock; high_watermark = SIZE_MAX ("never give spares back") hung every pool call.
BOOST_AUTO_TEST_CASE(a_huge_high_watermark_neither_hangs_nor_stalls_callers) {
    {
        vmmpp::budget b(64 * page);
        auto spinning = make_mapped(1, 4, 1ms);
        spinning.poll_interval = 0us;  // would turn the mapper's polling into a busy loop
        BOOST_CHECK_THROW(mapped_pool(4 * page, {}, spinning, b.register_model("m", 64 * page)), vmmpp::invalid_argument);
    }
    for (std::size_t high : {std::size_t{1} << 26, std::numeric_limits<std::size_t>::max()}) {
        vmmpp::budget b(64 * page);
        mapped_pool pool(4 * page, {}, make_mapped(1, high, 1ms), b.register_model("m", 64 * page));
        pool.ensure_committed(0, 4 * page);  // full: the mapper looks for a unit to map and finds none
        std::this_thread::sleep_for(5ms);
        auto stats = std::async(std::launch::async, [&] { return pool.stats(); });
        if (stats.wait_for(2s) != std::future_status::ready) {
            std::printf("FAIL: stats() blocked for 2 s behind the mapper (high_watermark %zu)\n", high);
            std::fflush(stdout);
            std::_Exit(1);  // the pool's lock is held for good: nothing can be torn down
        }
        BOOST_TEST(stats.get().held_pages == 4u);
        pool.release(0, 4 * page);
    }
}

// F8: trim() measured what it gave back as the drop in a counter the mapper changes without the
// pool's lock; with a mapper commit in between it returned a wrapped ~2^64. It now adds up what it
// gave back itself.
namespace {
struct slow_quota {
    void acquire(std::size_t) { std::this_thread::sleep_for(50ms); }
    void release(std::size_t) noexcept {}
};
static_assert(vmmpp::quota_policy<slow_quota>);
/// Dropping kept handles takes a while (cuMemRelease of many handles): trim() is still running
/// when the mapper's slow charge lands.
struct slow_dropping_host : keeping_host {
    using keeping_host::keeping_host;
    std::size_t release_cached() noexcept {
        std::this_thread::sleep_for(100ms);
        return keeping_host::release_cached();
    }
    friend constexpr void get_property(const slow_dropping_host&, vmmpp::host_accessible) noexcept {}
};
} // namespace
BOOST_AUTO_TEST_CASE(trim_reports_what_it_gave_back_while_the_mapper_charges) {
    using config = vmmpp::pool_config<slow_dropping_host, mapped, slow_quota>;
    vmmpp::elastic_pool<config> pool(16 * page, keeping_host_options{.max_kept = 0}, make_mapped(2, 4, 1000ms));
    pool.will_need(0, 1);                  // the mapper starts refilling: its charge takes 50 ms
    std::this_thread::sleep_for(10ms);  // inside that charge now
    const std::size_t given = pool.trim();
    BOOST_TEST(given == 0u);  // nothing was idle, nothing kept
}

// F3, the pool's side: a commit that takes a kept handle and then fails (the backing released the
// handle) must stop charging it as kept; the budget used to keep that charge for good.
namespace {
std::atomic<bool> lose_next_kept_handle{false};
struct losing_keeping_host : keeping_host {
    using keeping_host::keeping_host;
    void commit(std::size_t offset, std::size_t bytes) {
        if (!kept.empty() && lose_next_kept_handle.exchange(false)) {
            kept.pop_back();  // taken for reuse, then lost when mapping it failed
            throw vmmpp::cuda_error("cuMemMap", 2, "CUDA_ERROR_OUT_OF_MEMORY", "injected");
        }
        keeping_host::commit(offset, bytes);
    }
    friend constexpr void get_property(const losing_keeping_host&, vmmpp::host_accessible) noexcept {}
};
} // namespace
BOOST_AUTO_TEST_CASE(a_failed_commit_of_a_kept_handle_leaves_the_charge_exact) {
    using config = vmmpp::pool_config<losing_keeping_host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget b(8 * page);
    vmmpp::elastic_pool<config> pool(8 * page, keeping_host_options{.max_kept = 1}, {}, b.register_model("m", 8 * page));
    pool.ensure_committed(0, page);
    pool.release(0, page);
    BOOST_TEST(b.stats().committed == page);  // the kept handle
    lose_next_kept_handle = true;
    BOOST_CHECK_THROW(pool.ensure_committed(0, page), vmmpp::cuda_error);
    const auto s = pool.stats();
    BOOST_TEST(s.cached_bytes == 0u);
    BOOST_TEST(s.charged == 0u);
    BOOST_TEST(b.stats().committed == 0u);
}

// --- the mapper's decisions, on a clock the test moves (no thread, no sleep) ---

namespace {
/// A clock that only moves when a test says so.
struct manual_clock {
    using duration = std::chrono::nanoseconds;
    using rep = duration::rep;
    using period = duration::period;
    using time_point = std::chrono::time_point<manual_clock>;
    static constexpr bool is_steady = true;
};
using plan_type = vmmpp::detail::mapper_plan<manual_clock>;
using vmmpp::detail::unit_state;

/// Marks unit u committed and idle, as the pool does when the mapper has mapped it.
void map_spare(vmmpp::detail::unit_table& t, plan_type& plan, std::size_t u, manual_clock::time_point now) {
    t.state[u] = unit_state::committed;
    ++t.committed;
    t.idle.insert(u);
    plan.on_idle(t, u, now);
}
} // namespace

BOOST_AUTO_TEST_CASE(the_mapper_maps_breadth_first_from_the_newest_frontier_up_to_the_high_watermark) {
    vmmpp::detail::unit_table t(64);
    plan_type plan(make_mapped(2, 4, 100ms), t.size());
    const manual_clock::time_point now{};
    BOOST_TEST(!plan.next_to_map(t).has_value());  // nothing predicted, nothing wanted
    plan.will_need(40, 40);
    plan.will_need(0, 0);  // the newest frontier comes first
    std::vector<std::size_t> order;
    while (auto u = plan.next_to_map(t)) {
        order.push_back(*u);
        map_spare(t, plan, *u, now);
    }
    BOOST_TEST(order == (std::vector<std::size_t>{0, 40, 1, 41}), boost::test_tools::per_element());
    BOOST_TEST(!plan.refilling());  // at the high watermark: refilling stops
    // A caller takes two spares: below the low watermark a refill starts, once.
    for (std::size_t u : {std::size_t{0}, std::size_t{1}}) {
        t.idle.erase(u);
        t.held_pages[u] = 1;
    }
    BOOST_TEST(!plan.on_taken(t, 0, now));  // spares 40 and 41 left: not below the low watermark
    BOOST_TEST(!plan.on_taken(t, 1, now));  // the frontier at 0 advanced to 1, then to 2
    t.idle.erase(40);
    t.held_pages[40] = 1;
    BOOST_TEST(plan.on_taken(t, 40, now));   // 1 spare left, below 2: a refill starts
    BOOST_TEST(!plan.on_taken(t, 40, now));  // once
    std::vector<std::size_t> refill;
    while (auto u = plan.next_to_map(t)) {
        refill.push_back(*u);
        map_spare(t, plan, *u, now);
    }
    // Frontiers 2 and 41 (41 committed), breadth first: 2; then 3 (2 + 1) before 42 (41 + 1); up
    // to 4 spares (41 and three new).
    BOOST_TEST(refill == (std::vector<std::size_t>{2, 3, 42}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(the_mapper_search_is_bounded_when_everything_ahead_is_committed) {
    vmmpp::detail::unit_table t(100000);
    plan_type plan(make_mapped(1, std::numeric_limits<std::size_t>::max(), 100ms), t.size());
    BOOST_TEST(plan.high_watermark() == t.size());  // clamped: "never give spares back" means all
    for (std::size_t u = 0; u < t.size(); ++u) {
        t.state[u] = unit_state::committed;
        t.held_pages[u] = 1;
    }
    t.committed = t.size();
    for (std::size_t f = 0; f < plan_type::max_frontiers; ++f) {
        plan.will_need(f * 300, f * 300);
    }
    BOOST_TEST(!plan.next_to_map(t).has_value());  // max_scan looks at most, then it waits for demand
    BOOST_TEST(!plan.refilling());
    auto bad = make_mapped(5, 4, 100ms);
    BOOST_CHECK_THROW(plan_type(bad, 8), vmmpp::invalid_argument);
    auto spinning = make_mapped(1, 4, 100ms);
    spinning.poll_interval = 0us;
    BOOST_CHECK_THROW(plan_type(spinning, 8), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(spares_above_the_high_watermark_go_back_oldest_first_after_the_delay_and_the_gpu) {
    vmmpp::detail::unit_table t(16);
    plan_type plan(make_mapped(0, 2, 100ms), t.size());
    const manual_clock::time_point start{};
    for (std::size_t u = 0; u < 5; ++u) {
        map_spare(t, plan, u, start + std::chrono::milliseconds(10 * u));  // unit u idle since 10u ms
    }
    bool gpu_busy_on_1 = true;
    const auto gpu_done = [&](std::size_t u) { return u != 1 || !gpu_busy_on_1; };
    std::optional<manual_clock::time_point> deadline;
    BOOST_TEST(!plan.next_to_release(t, start + 99ms, deadline, gpu_done).has_value());
    BOOST_REQUIRE(deadline.has_value());
    BOOST_TEST((*deadline == start + 100ms));  // unit 0 is due then
    deadline.reset();
    auto u = plan.next_to_release(t, start + 100ms, deadline, gpu_done);
    BOOST_REQUIRE(u.has_value());
    BOOST_TEST(*u == 0u);
    t.idle.erase(0);
    t.state[0] = unit_state::uncommitted;
    deadline.reset();
    BOOST_TEST(!plan.next_to_release(t, start + 200ms, deadline, gpu_done).has_value());  // 1 waits for the GPU
    BOOST_REQUIRE(deadline.has_value());
    BOOST_TEST((*deadline == start + 200ms + plan_type::fence_poll_interval));
    gpu_busy_on_1 = false;
    u = plan.next_to_release(t, start + 201ms, deadline, gpu_done);
    BOOST_REQUIRE(u.has_value());
    BOOST_TEST(*u == 1u);
    t.idle.erase(1);
    t.state[1] = unit_state::uncommitted;
    // Unit 2 is taken again: that leaves 2 spares, the high watermark, so nothing more goes back.
    t.idle.erase(2);
    t.held_pages[2] = 1;
    BOOST_TEST(!plan.next_to_release(t, start + 500ms, deadline, gpu_done).has_value());  // 2 spares = high
    BOOST_TEST(t.idle.size() == 2u);
}

BOOST_AUTO_TEST_CASE(a_commit_the_caller_made_itself_sends_the_mapper_after_the_demand) {
    vmmpp::detail::unit_table t(128);
    plan_type plan(make_mapped(2, 4, 100ms), t.size());
    const manual_clock::time_point now{};
    for (std::size_t u = 100; u < 104; ++u) {
        map_spare(t, plan, u, now);  // spares kept where the cache stopped before it emptied
    }
    // The allocator starts again at the bottom: unit 0, committed by the caller.
    t.state[0] = unit_state::committed;
    t.held_pages[0] = 1;
    ++t.committed;
    BOOST_TEST(!plan.on_taken(t, 0, now));  // four spares: by the count, no refill
    BOOST_TEST(!plan.next_to_map(t).has_value());
    plan.on_missed();
    std::vector<std::size_t> mapped;
    while (auto u = plan.next_to_map(t)) {
        mapped.push_back(*u);
        map_spare(t, plan, *u, now);
    }
    BOOST_TEST(mapped == (std::vector<std::size_t>{1, 2, 3, 4}), boost::test_tools::per_element());  // high_watermark of them
    // The misplaced spares are now above the high watermark: they go back after the delay.
    std::optional<manual_clock::time_point> deadline;
    const auto gpu_done = [](std::size_t) { return true; };
    const auto u = plan.next_to_release(t, now + 100ms, deadline, gpu_done);
    BOOST_REQUIRE(u.has_value());
    BOOST_TEST(*u == 100u);
}
