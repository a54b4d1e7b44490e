// Limits changed at run time on vmmpp::budget (in process): raising takes effect at once,
// lowering takes spares back at once, refuses commits above the new limit and reports what live
// blocks still hold over it; and the same under concurrent appends of several host-backed
// caches. Also the stats snapshot's JSON. (The cross-process budget: tests/multiprocess.)
#define BOOST_TEST_MODULE runtime_limits
#include "support/cpu_main.hpp"

#include <atomic>
#include <cstddef>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/stats.hpp"

namespace {

constexpr std::size_t page = std::size_t{64} << 10;  // host pages of 64 KiB keep the tests light
using host_budget_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
using pool_t = vmmpp::elastic_pool<host_budget_config>;
using cache_t = vmmpp::kv_cache<host_budget_config, vmmpp::block_major>;

std::unique_ptr<pool_t> make_pool(vmmpp::shared_budget share, std::size_t spare_pages = 0, std::size_t pages = 64) {
    return std::make_unique<pool_t>(pages * page, vmmpp::host_options{.page_bytes = page},
                                    vmmpp::page_granular{.spare_pages = spare_pages}, std::move(share));
}

// 2 layers x K/V x 16 tokens x 64 x 2 bytes: 8 KiB blocks, 8 to a page.
constexpr vmmpp::kv_geometry geometry{.layers = 2, .kv_heads = 1, .head_dim = 64, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 4096};

std::unique_ptr<cache_t> make_cache(vmmpp::shared_budget share) {
    return std::make_unique<cache_t>(geometry, vmmpp::host_options{.page_bytes = page}, vmmpp::page_granular{},
                                     std::move(share), vmmpp::kv_cache_options{.span_alignment = page});
}

const vmmpp::model_stats& model(const vmmpp::budget_stats& s, const std::string& name) {
    for (const auto& m : s.models) {
        if (m.name == name) {
            return m;
        }
    }
    throw std::runtime_error("no model " + name);
}

} // namespace

BOOST_AUTO_TEST_CASE(raising_a_limit_takes_effect_at_once) {
    vmmpp::budget b(8 * page);
    auto pool = make_pool(b.register_model("a", 2 * page));
    pool->ensure_committed(0, 2 * page);
    BOOST_CHECK_THROW(pool->ensure_committed(2 * page, page), vmmpp::over_quota);

    const vmmpp::limit_change c = b.set_model_limit("a", 4 * page);
    BOOST_TEST(c.applied());
    BOOST_TEST(c.previous == 2 * page);
    BOOST_TEST(c.limit == 4 * page);
    BOOST_TEST(c.bytes_over == 0u);
    BOOST_TEST(c.reclaimed == 0u);
    pool->ensure_committed(2 * page, 2 * page);  // now fits
    BOOST_TEST(b.stats().committed == 4 * page);

    // The global limit, through set_limit, and a share's own setter.
    BOOST_TEST(pool->quota().stats().limit == 4 * page);
    BOOST_TEST(b.set_limit(4 * page).applied());
    vmmpp::shared_budget share = pool->quota();
    BOOST_TEST(share.set_limit(6 * page).applied());
    BOOST_CHECK_THROW(pool->ensure_committed(4 * page, page), vmmpp::over_quota);  // global 4 pages
    BOOST_TEST(b.set_limit(6 * page).applied());
    pool->ensure_committed(4 * page, 2 * page);
    BOOST_TEST(b.stats().committed == 6 * page);
}

BOOST_AUTO_TEST_CASE(lowering_takes_spares_back_refuses_growth_and_reports_what_is_over) {
    vmmpp::budget b(64 * page);
    auto busy = make_pool(b.register_model("a", 16 * page), /*spare_pages=*/4);
    auto other = make_pool(b.register_model("b", 16 * page), /*spare_pages=*/4);
    busy->ensure_committed(0, 6 * page);
    busy->release(2 * page, 4 * page);  // 4 spares kept, 2 pages live
    other->ensure_committed(0, 3 * page);
    other->release(0, 3 * page);        // 3 spares, nothing live
    BOOST_TEST(vmmpp::report_spares(*busy) == 4 * page);
    BOOST_TEST(vmmpp::report_spares(*other) == 3 * page);
    BOOST_TEST(model(b.stats(), "a").spares == 4 * page);
    BOOST_TEST(b.stats().committed == 9 * page);

    const vmmpp::limit_change c = b.set_model_limit("a", page);
    BOOST_TEST(!c.applied());
    BOOST_TEST((c.status == vmmpp::limit_change::state::pending));
    BOOST_TEST(c.reclaimed == 4 * page);  // a's spares, at once
    BOOST_TEST(c.committed == 2 * page);  // its live pages stay
    BOOST_TEST(c.bytes_over == page);
    BOOST_TEST(busy->stats().committed == 2 * page);
    BOOST_TEST(other->stats().committed == 3 * page);  // another model's spares are not touched
    const vmmpp::model_stats a = model(b.stats(), "a");
    BOOST_TEST(a.reclaims == 1u);
    BOOST_TEST(a.reclaimed == 4 * page);
    BOOST_TEST(a.over() == page);
    BOOST_TEST(a.spares == 0u);  // the reclaim took every spare: the report says so
    BOOST_TEST(model(b.stats(), "b").spares == 3 * page);

    // Above the new limit nothing more is committed, and the pool is unchanged by the refusal.
    BOOST_CHECK_THROW(busy->ensure_committed(2 * page, page), vmmpp::over_quota);
    BOOST_TEST(busy->stats().committed == 2 * page);
    // A live page goes, and the pool keeps it as a spare (its policy): still over. Its next
    // growth is refused, and the pool gives its own spares back before it refuses: now it fits.
    busy->release(0, page);
    BOOST_TEST(model(b.stats(), "a").over() == page);
    BOOST_CHECK_THROW(busy->ensure_committed(2 * page, page), vmmpp::over_quota);
    BOOST_TEST(model(b.stats(), "a").committed == page);
    BOOST_TEST(model(b.stats(), "a").over() == 0u);

    // That refusal asked the other model for its spares too (budget pressure, as before).
    BOOST_TEST(model(b.stats(), "b").reclaims == 1u);
    BOOST_TEST(other->stats().committed == 0u);

    // The global limit: every model's spares come back.
    other->ensure_committed(0, 3 * page);
    other->release(0, 3 * page);
    const vmmpp::limit_change g = b.set_limit(page / 2);
    BOOST_TEST(g.reclaimed == 3 * page);
    BOOST_TEST(g.committed == page);
    BOOST_TEST(g.bytes_over == page / 2);
    BOOST_TEST(!g.applied());
    BOOST_TEST(b.stats().over() == page / 2);
    BOOST_TEST(model(b.stats(), "b").reclaims == 2u);
    busy->release(page, page);
    (void)busy->trim();
    const vmmpp::budget_stats after = b.stats();
    BOOST_TEST(after.committed == 0u);
    BOOST_TEST(after.over() == 0u);
}

BOOST_AUTO_TEST_CASE(bad_changes_are_refused_and_change_nothing) {
    vmmpp::budget b(8 * page);
    auto pool = make_pool(b.register_model("a", 2 * page));
    BOOST_CHECK_THROW((void)b.set_model_limit("nobody", page), vmmpp::unknown_model);
    BOOST_CHECK_THROW((void)b.set_model_limit("a", 0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)b.set_limit(0), vmmpp::invalid_argument);
    vmmpp::shared_budget share = pool->quota();
    BOOST_CHECK_THROW((void)share.set_limit(0), vmmpp::invalid_argument);
    const vmmpp::budget_stats s = b.stats();
    BOOST_TEST(s.limit == 8 * page);
    BOOST_TEST(model(s, "a").limit == 2 * page);
}

// Caches of two models append from four threads while the main thread lowers and raises their
// limits and the global one. Afterwards every byte the budget counts is a byte a pool charged,
// and in an append-only phase after a lowering nothing is committed above the new limit.
BOOST_AUTO_TEST_CASE(limits_change_under_concurrent_appends) {
    constexpr std::size_t threads = 4;
    vmmpp::budget b(96 * page);
    std::vector<std::unique_ptr<cache_t>> caches;
    const std::vector<vmmpp::shared_budget> shares{b.register_model("m0", 64 * page),
                                                   b.register_model("m1", 64 * page)};
    for (std::size_t t = 0; t < threads; ++t) {
        caches.push_back(make_cache(shares[t % 2]));
    }
    std::atomic<int> phase{0};  // 0: append and free; 1: append only; 2: stop
    std::atomic<std::size_t> refusals{0};
    std::atomic<std::size_t> appended{0};
    std::atomic<bool> foreign_error{false};
    auto work = [&](std::size_t t) {
        cache_t& cache = *caches[t];
        std::mt19937_64 rng(t + 1);
        std::vector<vmmpp::seq_id> live;
        while (phase.load() < 2) {
            try {
                if (phase.load() == 0 && !live.empty() && rng() % 4 == 0) {
                    const std::size_t i = rng() % live.size();
                    cache.free(live[i]);
                    live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
                    continue;
                }
                if (live.empty() || rng() % 8 == 0) {
                    live.push_back(cache.add_sequence());
                }
                (void)cache.append(live[rng() % live.size()], 1 + rng() % 64);
                appended += 1;
            } catch (const vmmpp::over_quota&) {
                refusals += 1;
                std::this_thread::yield();
            } catch (...) {
                foreign_error = true;
                return;
            }
        }
    };
    std::vector<std::thread> workers;
    for (std::size_t t = 0; t < threads; ++t) {
        workers.emplace_back(work, t);
    }
    std::mt19937_64 rng(42);
    for (int i = 0; i < 300; ++i) {
        const std::size_t limit = (4 + rng() % 60) * page;
        const vmmpp::limit_change c =
            rng() % 3 == 0 ? b.set_limit(limit + 32 * page) : b.set_model_limit(rng() % 2 ? "m0" : "m1", limit);
        BOOST_TEST((c.applied() == (c.bytes_over == 0)));
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    // Lower m0 under what it holds, then let the threads only append: m0 never grows again.
    phase = 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const std::size_t held = model(b.stats(), "m0").committed;
    const vmmpp::limit_change low = b.set_model_limit("m0", page);
    BOOST_TEST(low.committed <= held);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    BOOST_TEST(model(b.stats(), "m0").committed <= low.committed);
    phase = 2;
    for (auto& w : workers) {
        w.join();
    }
    BOOST_TEST(!foreign_error.load());
    BOOST_TEST(appended.load() > 0u);
    BOOST_TEST(refusals.load() > 0u);

    const vmmpp::budget_stats s = b.stats();
    std::size_t charged[2] = {0, 0};
    for (std::size_t t = 0; t < threads; ++t) {
        charged[t % 2] += caches[t]->pool().stats().charged;
    }
    BOOST_TEST(model(s, "m0").committed == charged[0]);
    BOOST_TEST(model(s, "m1").committed == charged[1]);
    BOOST_TEST(s.committed == charged[0] + charged[1]);

    // Raise again: the caches grow at once.
    BOOST_TEST(b.set_limit(96 * page).applied());
    BOOST_TEST(b.set_model_limit("m0", 64 * page).applied());
    const std::size_t before = caches[0]->pool().stats().committed;
    const auto seq = caches[0]->add_sequence();
    (void)caches[0]->append(seq, 16 * 8 * 4);  // 4 pages of blocks
    BOOST_TEST(caches[0]->pool().stats().committed >= before + 3 * page);
}

BOOST_AUTO_TEST_CASE(a_snapshot_renders_pools_caches_models_and_the_budget_as_json) {
    vmmpp::budget b(8 * page);
    auto cache = make_cache(b.register_model("llama \"8b\"", 4 * page));
    const auto seq = cache->add_sequence();
    (void)cache->append(seq, 20);
    vmmpp::stats_snapshot snap{};
    snap.unix_ms = 1234;
    snap.add_cache("llama", *cache).set_budget(b.stats());
    const std::string json = vmmpp::to_json(snap);
    BOOST_TEST_MESSAGE(json);
    BOOST_TEST(json.starts_with("{\"unix_ms\":1234,\"budget\":{\"limit\":524288,\"committed\":65536,\"over\":0,"));
    BOOST_TEST(json.find("\"name\":\"llama \\\"8b\\\"\"") != std::string::npos);  // escaped
    BOOST_TEST(json.find("\"cache\":{\"sequences\":1,\"used_blocks\":2,\"free_blocks\":4094,\"block_bytes\":8192,"
                         "\"cow_copies\":0,\"asleep\":false}") != std::string::npos);
    BOOST_TEST(json.find("\"pool\":{\"reserved\":") != std::string::npos);
    BOOST_TEST(json.find("\"model\":{\"name\":\"llama \\\"8b\\\"\",\"limit\":262144,\"committed\":65536,") !=
               std::string::npos);
    BOOST_TEST(json.ends_with("}]}"));
    // Balanced, and no control characters: a cheap well-formedness check.
    int depth = 0;
    bool in_string = false;
    for (std::size_t i = 0; i < json.size(); ++i) {
        const char c = json[i];
        BOOST_TEST(static_cast<unsigned char>(c) >= 0x20);
        if (in_string) {
            if (c == '\\') {
                ++i;
            } else if (c == '"') {
                in_string = false;
            }
        } else if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            ++depth;
        } else if (c == '}' || c == ']') {
            --depth;
            BOOST_TEST(depth >= 0);
        }
    }
    BOOST_TEST(depth == 0);
}
