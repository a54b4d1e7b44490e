// host_tier over a cache in host memory (no GPU: copies are memcpy), randomized against a model
// of every block's bytes: requests share prefixes, caches evict into a small tier that evicts in
// turn, prefixes come back from the tier, sequences are swapped out and in. Every sequence's
// every block must hold the bytes its tokens wrote. The stream order of the same paths is tested
// on the fake driver (test_host_tier_fakecuda).
#define BOOST_TEST_MODULE host tier
#include "support/cpu_main.hpp"

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/tier/host_tier.hpp"

namespace {

constexpr vmmpp::kv_geometry geom{.layers = 2, .kv_heads = 1, .head_dim = 8, .type = vmmpp::dtype::f16,
                                  .block_tokens = 4, .max_blocks = 24};
using cache_t = vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major>;
using prefix_t = vmmpp::prefix_cache<cache_t>;
using tier_t = vmmpp::host_tier<prefix_t, vmmpp::host_config>;
constexpr std::size_t token_bytes = 1 * 8 * 2;  // one layer's K (or V) of a token

/// The byte every K and V element of token `t` (at position `pos`) holds: a function of the
/// token and its position, so a block of the same tokens elsewhere in a prompt differs.
unsigned char token_byte(std::int32_t t, std::size_t pos) { return static_cast<unsigned char>(t * 7 + pos * 13 + 1); }

void write_tokens(cache_t& c, vmmpp::seq_id s, const std::vector<std::int32_t>& tokens, std::size_t from) {
    const auto table = c.block_table(s);
    for (std::size_t i = from; i < tokens.size(); ++i) {
        const std::int32_t b = table[i / geom.block_tokens];
        const std::size_t slot = i % geom.block_tokens;
        for (std::uint32_t l = 0; l < geom.layers; ++l) {
            std::memset(c.key(l, b) + slot * token_bytes, token_byte(tokens[i], i), token_bytes);
            std::memset(c.value(l, b) + slot * token_bytes, token_byte(tokens[i], i), token_bytes);
        }
    }
}

/// Tokens of `s` whose bytes differ from what `tokens` wrote.
std::size_t wrong_tokens(const cache_t& c, vmmpp::seq_id s, const std::vector<std::int32_t>& tokens) {
    const auto table = c.block_table(s);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
        const std::int32_t b = table[i / geom.block_tokens];
        const std::size_t slot = i % geom.block_tokens;
        bool ok = true;
        for (std::uint32_t l = 0; l < geom.layers; ++l) {
            for (const std::byte* p : {c.key(l, b), c.value(l, b)}) {
                for (std::size_t k = 0; k < token_bytes; ++k) {
                    ok = ok && static_cast<unsigned char>(p[slot * token_bytes + k]) == token_byte(tokens[i], i);
                }
            }
        }
        bad += ok ? 0 : 1;
    }
    return bad;
}

} // namespace

BOOST_AUTO_TEST_SUITE(host_tier_on_host_memory)

BOOST_AUTO_TEST_CASE(randomized_requests_with_a_small_tier_keep_every_token) {
    cache_t c{geom};
    prefix_t prefix{c, {.max_cached_bytes = 8 * 2 * 2 * 4 * token_bytes}};  // a few evictable blocks
    tier_t tier{prefix, {.max_blocks = 10}};
    std::mt19937 rng(20261207);
    // 4 shared system prompts of 2-3 blocks; requests add a few blocks of their own.
    std::vector<std::vector<std::int32_t>> heads;
    for (int h = 0; h < 4; ++h) {
        std::vector<std::int32_t> t(geom.block_tokens * (2 + h % 2));
        for (auto& x : t) {
            x = static_cast<std::int32_t>(rng() % 50);
        }
        heads.push_back(t);
    }
    std::map<vmmpp::seq_id, std::vector<std::int32_t>> live;  // the model: each sequence's tokens
    std::map<std::uint64_t, std::vector<std::int32_t>> swapped;
    std::size_t host_hit_tokens = 0, refused = 0, stored_ahead = 0;
    for (int step = 0; step < 3000; ++step) {
        const unsigned op = rng() % 10;
        if (op < 4) {  // a new request
            std::vector<std::int32_t> tokens = heads[rng() % heads.size()];
            for (std::size_t n = rng() % 9; n > 0; --n) {
                tokens.push_back(static_cast<std::int32_t>(rng() % 50));
            }
            const auto t = tier.attach(tokens, {});
            host_hit_tokens += t.host_tokens;
            BOOST_TEST_REQUIRE(wrong_tokens(c, t.seq, std::vector<std::int32_t>(tokens.begin(), tokens.begin() +
                                                                               static_cast<std::ptrdiff_t>(t.cached_tokens))) == 0u);
            try {
                prefix.append(t.seq, tokens.size() - t.cached_tokens);
            } catch (const vmmpp::out_of_blocks&) {
                prefix.free(t.seq);
                ++refused;
                continue;
            }
            write_tokens(c, t.seq, tokens, t.cached_tokens);
            prefix.publish(t.seq, tokens);
            live.emplace(t.seq, tokens);
        } else if (op < 7 && !live.empty()) {  // a request ends
            auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rng() % live.size()));
            BOOST_TEST_REQUIRE(wrong_tokens(c, it->first, it->second) == 0u);
            prefix.free(it->first);
            live.erase(it);
        } else if (op < 8 && !live.empty()) {  // preempted: swapped out
            auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rng() % live.size()));
            try {
                swapped.emplace(tier.swap_out(it->first, nullptr), it->second);
                live.erase(it);
            } catch (const vmmpp::tier_full& e) {
                BOOST_TEST_REQUIRE(e.needed() > e.free());
                BOOST_TEST_REQUIRE(c.contains(it->first));
            }
        } else if (op < 9 && !swapped.empty()) {  // resumed
            auto it = std::next(swapped.begin(), static_cast<std::ptrdiff_t>(rng() % swapped.size()));
            try {
                const vmmpp::seq_id s = tier.swap_in(it->first, nullptr);
                BOOST_TEST_REQUIRE(wrong_tokens(c, s, it->second) == 0u);
                live.emplace(s, it->second);
                swapped.erase(it);
            } catch (const vmmpp::out_of_blocks&) {
                ++refused;  // no room on the "GPU": stays swapped out
            }
        } else if (op < 10 && rng() % 2 == 0) {
            stored_ahead += tier.store_ahead(rng() % 3);
        } else {
            (void)prefix.evict(1 + rng() % 3);
        }
        const auto st = tier.stats();
        BOOST_TEST_REQUIRE(st.keyed_blocks + st.swapped_blocks + st.free_blocks == st.max_blocks);
    }
    for (const auto& [s, tokens] : live) {
        BOOST_TEST(wrong_tokens(c, s, tokens) == 0u);
    }
    const auto st = tier.stats();
    BOOST_TEST_MESSAGE("offloaded " << st.offloaded_blocks << ", loaded " << st.loaded_blocks << ", dropped "
                                    << st.dropped_blocks << ", swapped out " << st.swapped_out << ", in "
                                    << st.swapped_in << ", refused " << refused);
    BOOST_TEST(st.offloaded_blocks > 0u);  // the paths under test ran
    BOOST_TEST(st.loaded_blocks > 0u);
    BOOST_TEST(host_hit_tokens > 0u);
    BOOST_TEST(st.swapped_in > 0u);
    BOOST_TEST(st.evicted_blocks > 0u);
    BOOST_TEST(st.stored_ahead_blocks == stored_ahead);
    BOOST_TEST(stored_ahead > 0u);
}

BOOST_AUTO_TEST_SUITE_END()
