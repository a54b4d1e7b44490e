// Models that come and go on vmmpp::budget: a model is unregistered when its last share goes (its
// caches and pools destroyed, the share register_model returned and every copy of it), its name
// can be registered again, the statistics (and their JSON) list only live models, and a kv_cache
// constructor that throws after its argument registered leaves the budget as it was.
// (The cross-process budget's side of this: tests/multiprocess/test_process_budget.cpp.)
#define BOOST_TEST_MODULE model_lifecycle
#include "support/cpu_main.hpp"

#include <algorithm>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/stats.hpp"

namespace {

constexpr std::size_t page = std::size_t{64} << 10;  // host pages of 64 KiB keep the tests light
using host_budget_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
using cache_t = vmmpp::kv_cache<host_budget_config, vmmpp::block_major>;

// 2 layers x K/V x 16 tokens x 64 x 2 bytes: 8 KiB blocks, 8 to a page.
constexpr vmmpp::kv_geometry geometry{.layers = 2, .kv_heads = 1, .head_dim = 64, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 1024};

std::unique_ptr<cache_t> make_cache(vmmpp::shared_budget share, const vmmpp::kv_geometry& g = geometry) {
    return std::make_unique<cache_t>(g, vmmpp::host_options{.page_bytes = page}, vmmpp::page_granular{},
                                     std::move(share), vmmpp::kv_cache_options{.span_alignment = page});
}

std::vector<std::string> names(const vmmpp::budget_stats& s) {
    std::vector<std::string> out;
    for (const auto& m : s.models) {
        out.push_back(m.name);
    }
    return out;
}

} // namespace

BOOST_AUTO_TEST_CASE(unload_and_reload_a_model_in_a_loop_keeps_the_budget_flat) {
    vmmpp::budget b(64 * page);
    auto resident = make_cache(b.register_model("resident", 16 * page));  // stays loaded throughout
    const auto r = resident->add_sequence();
    (void)resident->append(r, 100);
    const std::size_t resident_bytes = b.stats().committed;
    BOOST_REQUIRE(resident_bytes > 0u);

    for (int round = 0; round < 100; ++round) {
        // A reload may state another limit: the old registration is gone, not joined.
        const std::size_t limit = (8 + round % 8) * page;
        auto cache = make_cache(b.register_model("llama", limit));
        const auto seq = cache->add_sequence();
        (void)cache->append(seq, 16 * static_cast<std::size_t>(1 + round % 40));
        const vmmpp::budget_stats loaded = b.stats();
        BOOST_TEST_REQUIRE(loaded.models.size() == 2u);
        BOOST_TEST(loaded.committed == resident_bytes + cache->pool().committed_bytes());
        const auto llama = std::find_if(loaded.models.begin(), loaded.models.end(),
                                        [](const vmmpp::model_stats& m) { return m.name == "llama"; });
        BOOST_TEST_REQUIRE((llama != loaded.models.end()));
        BOOST_TEST(llama->limit == limit);
        BOOST_TEST(llama->denied == 0u);  // a fresh registration: the last round's counters are gone
        cache.reset();                    // unload: the cache held the last share

        const vmmpp::budget_stats unloaded = b.stats();
        BOOST_TEST(unloaded.committed == resident_bytes);
        BOOST_TEST(names(unloaded) == std::vector<std::string>{"resident"}, boost::test_tools::per_element());
        BOOST_CHECK_THROW(b.set_model_limit("llama", page), vmmpp::unknown_model);
    }
    BOOST_TEST(resident->pool().committed_bytes() == resident_bytes);
}

BOOST_AUTO_TEST_CASE(a_model_lives_while_any_copy_of_its_share_lives) {
    vmmpp::budget b(16 * page);
    std::optional<vmmpp::shared_budget> kept;
    {
        auto share = b.register_model("m", 4 * page);
        kept = share;  // a copy
        auto cache = make_cache(std::move(share));
        (void)cache->append(cache->add_sequence(), 64);
    }
    BOOST_TEST(names(b.stats()) == std::vector<std::string>{"m"}, boost::test_tools::per_element());
    BOOST_CHECK_THROW((void)b.register_model("m", 4 * page), vmmpp::invalid_argument);
    BOOST_TEST(b.stats().committed == 0u);  // the cache gave its pages back when it went

    vmmpp::shared_budget moved = std::move(*kept);
    kept.reset();  // a moved-from share is no share
    BOOST_TEST(b.stats().models.size() == 1u);
    moved = b.register_model("other", 2 * page);  // assigning over the last share unregisters it
    BOOST_TEST(names(b.stats()) == std::vector<std::string>{"other"}, boost::test_tools::per_element());
    auto again = b.register_model("m", 8 * page);
    BOOST_TEST(again.stats().limit == 8 * page);
}

BOOST_AUTO_TEST_CASE(a_constructor_that_throws_leaves_the_budget_as_it_was) {
    vmmpp::budget b(16 * page);
    auto bad = geometry;
    bad.head_dim = 0;
    BOOST_CHECK_THROW((void)make_cache(b.register_model("qwen", 8 * page), bad), vmmpp::invalid_argument);
    BOOST_TEST(b.stats().models.empty());
    BOOST_TEST(b.stats().committed == 0u);
    // The README's one-line pattern, corrected: the name is free.
    auto cache = make_cache(b.register_model("qwen", 8 * page));
    (void)cache->append(cache->add_sequence(), 16);
    BOOST_TEST(names(b.stats()) == std::vector<std::string>{"qwen"}, boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(the_json_snapshot_lists_only_live_models) {
    vmmpp::budget b(16 * page);
    auto kept = make_cache(b.register_model("kept", 4 * page));
    {
        auto gone = make_cache(b.register_model("gone", 4 * page));
        (void)gone->append(gone->add_sequence(), 16);
    }
    vmmpp::stats_snapshot snap{};  // value-initialized: see stats_snapshot
    snap.add_cache("kept", *kept).set_budget(b.stats());
    const std::string json = vmmpp::to_json(snap);
    BOOST_TEST_MESSAGE(json);
    BOOST_TEST(json.find("\"name\":\"kept\"") != std::string::npos);
    BOOST_TEST(json.find("gone") == std::string::npos);
}
