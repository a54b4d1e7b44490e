// prefix_cache (vmmpp/prefix/) on the host configuration in every paged layout (CI runs these for
// real): keys, publish/lookup/attach/free/evict, kv_cache::adopt's strong guarantee, the bound,
// page-aware eviction against the pool's committed bytes, events, soft memory under append, and
// a randomized run against a reference model that checks the cached blocks' bytes.
#define BOOST_TEST_MODULE prefix cache
#include "support/cpu_main.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "support/kv_factories.hpp"
#include "support/kv_tokens.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/relocate.hpp"
#include "vmmpp/prefix/page_groups.hpp"
#include "vmmpp/prefix/page_users.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"

using namespace vmmpp_test;
using vmmpp::kv_part;

namespace {

using prefix_cases = vmmpp::apply_t<kv_cases_over<vmmpp::host_config, vmmpp::paged_kv_layouts>, std::tuple>;

// 4 tokens a block, 2 layers, 2 heads, 64 dims, fp16: a block of 4 KiB (block_major).
constexpr vmmpp::kv_geometry small{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 4, .max_blocks = 256};
// Large blocks in a span of whole pages: a block tensor of 32 KiB, a block of 128 KiB; 256 blocks
// fill 32 MiB exactly in every paged layout.
constexpr vmmpp::kv_geometry paged{.layers = 2, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 256};

using tokens_t = std::vector<std::int32_t>;

/// A token's KV depends on every token up to it: a rolling hash of the prefix, 16 bits.
std::uint16_t kv_value(const tokens_t& t, std::size_t i) {
    std::uint32_t h = 2166136261u;
    for (std::size_t j = 0; j <= i; ++j) {
        h = (h ^ static_cast<std::uint32_t>(t[j])) * 16777619u;
    }
    return static_cast<std::uint16_t>(h ^ (h >> 16));
}
/// Writes the KV of tokens [first, tokens.size()) of `seq`.
template <class Cache>
void write_kv(Cache& c, vmmpp::seq_id seq, const tokens_t& tokens, std::size_t first) {
    std::vector<std::int64_t> slots(tokens.size() - first);
    c.slot_mapping(seq, first, slots);
    for (std::size_t i = first; i < tokens.size(); ++i) {
        write_token(c, slots[i - first], kv_value(tokens, i));
    }
}
/// Whether the KV of tokens [0, n) of `seq` is that of `tokens`.
template <class Cache>
bool kv_matches(const Cache& c, vmmpp::seq_id seq, const tokens_t& tokens, std::size_t n) {
    std::vector<std::int64_t> slots(n);
    c.slot_mapping(seq, 0, slots);
    for (std::size_t i = 0; i < n; ++i) {
        const auto v = kv_value(tokens, i);
        if (read_token(c, slots[i]) != std::pair{v, v}) {
            return false;
        }
    }
    return true;
}
/// A sequence of `tokens` appended, written and published.
template <class Prefix>
vmmpp::seq_id run_prompt(Prefix& pc, const tokens_t& tokens, std::span<const std::uint64_t> extra = {}) {
    auto& c = pc.cache();
    const auto [seq, cached] = pc.attach(tokens, extra);
    pc.append(seq, tokens.size() - cached);
    write_kv(c, seq, tokens, cached);
    pc.publish(seq, tokens, extra);
    return seq;
}
tokens_t iota_tokens(std::size_t n, std::int32_t first) {
    tokens_t t(n);
    for (std::size_t i = 0; i < n; ++i) {
        t[i] = first + static_cast<std::int32_t>(i);
    }
    return t;
}

} // namespace

BOOST_AUTO_TEST_CASE(block_keys_chain_and_separate) {
    const tokens_t a = iota_tokens(8, 1);
    tokens_t b = a;
    b[6] = 99;  // differs in the second block only
    std::vector<vmmpp::block_key> ka, kb, kx;
    const std::uint64_t lora[] = {7};
    vmmpp::for_each_block_key(a, 4, {}, [&](std::size_t, const vmmpp::block_key& k) { ka.push_back(k); return true; });
    vmmpp::for_each_block_key(b, 4, {}, [&](std::size_t, const vmmpp::block_key& k) { kb.push_back(k); return true; });
    vmmpp::for_each_block_key(a, 4, lora, [&](std::size_t, const vmmpp::block_key& k) { kx.push_back(k); return true; });
    BOOST_TEST_REQUIRE(ka.size() == 2u);
    BOOST_TEST((ka[0] == kb[0]));  // same first block
    BOOST_TEST(!(ka[1] == kb[1]));
    BOOST_TEST(!(ka[0] == kx[0]));  // extra keys make another entry
    // Chained: the same block after another parent is another key.
    const tokens_t second(a.begin() + 4, a.end());
    BOOST_TEST(!(vmmpp::hash_block(vmmpp::root_block_key, second) == ka[1]));
    BOOST_TEST((vmmpp::hash_block(ka[0], second) == ka[1]));
    // Both lanes move with a one-bit change, and no key of 4096 single-token blocks repeats.
    const std::int32_t one[] = {0}, other[] = {1};
    const auto k0 = vmmpp::hash_block(vmmpp::root_block_key, one), k1 = vmmpp::hash_block(vmmpp::root_block_key, other);
    BOOST_TEST(k0.hi != k1.hi);
    BOOST_TEST(k0.lo != k1.lo);
    std::set<std::pair<std::uint64_t, std::uint64_t>> seen;
    for (std::int32_t t = 0; t < 4096; ++t) {
        const std::int32_t tok[] = {t};
        const auto k = vmmpp::hash_block(vmmpp::root_block_key, tok);
        seen.insert({k.hi, k.lo});
        seen.insert({k.hi, ~k.lo});  // lanes are not copies of each other either
        BOOST_TEST(k.hi != k.lo);
    }
    BOOST_TEST(seen.size() == 2u * 4096u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(publish_lookup_attach_free, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const tokens_t prompt = iota_tokens(10, 100);  // 2 full blocks and 2 tokens
    BOOST_TEST(pc.lookup(prompt) == 0u);
    const auto a = run_prompt(pc, prompt);
    BOOST_TEST(pc.cached_blocks() == 2u);
    BOOST_TEST(pc.lookup(prompt) == 8u);
    BOOST_TEST(pc.lookup(std::span(prompt).first(7)) == 4u);  // whole blocks only
    const auto table = c.block_table(a);
    BOOST_TEST(c.block_refs(table[0]) == 2u);  // the sequence's and the prefix cache's
    BOOST_TEST(c.block_refs(table[2]) == 1u);  // partial: not published
    BOOST_TEST(pc.evictable_blocks() == 0u);   // live
    const std::vector<std::int32_t> cached(table.begin(), table.begin() + 2);
    pc.free(a);
    BOOST_TEST(c.block_refs(cached[0]) == 1u);
    BOOST_TEST(pc.evictable_blocks() == 2u);
    BOOST_TEST(c.used_blocks() == 2u);  // the freed sequence's partial block went back

    // A longer prompt with the same start gets the blocks, and their KV.
    tokens_t longer = prompt;
    longer.insert(longer.end(), {1, 2, 3, 4, 5, 6});
    const auto [b, hit] = pc.attach(longer);
    BOOST_TEST(hit == 8u);
    BOOST_TEST(c.tokens(b) == 8u);
    BOOST_TEST((std::vector<std::int32_t>(c.block_table(b).begin(), c.block_table(b).end()) == cached));
    BOOST_TEST(kv_matches(c, b, longer, 8));
    BOOST_TEST(pc.stats().hits == 2u);
    BOOST_TEST(pc.stats().misses == 4u);  // the first attach missed 2; longer has 4 full blocks, 2 cached
    pc.append(b, longer.size() - hit);
    BOOST_TEST(c.cow_copies() == 0u);  // full shared blocks are never written: no copy
    write_kv(c, b, longer, hit);
    BOOST_TEST(pc.publish(b, longer) == 2u);
    BOOST_TEST(pc.lookup(longer) == 16u);
    BOOST_TEST(pc.publish(b, longer) == 0u);  // registered once
    pc.free(b);
    BOOST_TEST(pc.evictable_blocks() == 4u);
    const auto r = pc.clear();
    BOOST_TEST(r.blocks.size() == 4u);
    BOOST_TEST(c.used_blocks() == 0u);
    BOOST_TEST(pc.lookup(longer) == 0u);
    BOOST_TEST(pc.stats().evictions == 4u);

    // publish checks its arguments.
    const auto d = c.add_sequence();
    BOOST_CHECK_THROW(pc.publish(d, prompt), vmmpp::invalid_argument);  // more tokens than the sequence has
    BOOST_CHECK_THROW(pc.publish(d + 1000, prompt), vmmpp::invalid_argument);
    c.free(d);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(extra_keys_and_duplicates, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const tokens_t prompt = iota_tokens(8, 5);
    const std::uint64_t lora1[] = {1}, lora2[] = {2};
    const auto a = run_prompt(pc, prompt, lora1);
    BOOST_TEST(pc.lookup(prompt, lora1) == 8u);
    BOOST_TEST(pc.lookup(prompt, lora2) == 0u);
    BOOST_TEST(pc.lookup(prompt) == 0u);
    // The same prompt computed again by a request that ran beside the first (it did not hit):
    // its blocks are not registered twice.
    const auto b = c.add_sequence();
    c.append(b, prompt.size());
    write_kv(c, b, prompt, 0);
    BOOST_TEST(pc.publish(b, prompt, lora1) == 0u);
    BOOST_TEST(pc.cached_blocks() == 2u);
    BOOST_TEST(c.block_refs(c.block_table(b)[0]) == 1u);
    // Under the other adapter it is other content.
    BOOST_TEST(pc.publish(b, prompt, lora2) == 2u);
    BOOST_TEST(pc.cached_blocks() == 4u);
    pc.free(a);
    pc.free(b);
    const auto [d, hit] = pc.attach(prompt, lora2);
    BOOST_TEST(hit == 8u);
    BOOST_TEST(c.block_table(d)[0] == *pc.block_of(*pc.key_of(c.block_table(d)[0])));
    BOOST_TEST(kv_matches(c, d, prompt, 8));
    c.free(d);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(adopt_is_strong, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    const auto a = c.add_sequence();
    c.append(a, 10);  // 4 + 4 + 2
    const auto t = c.block_table(a);
    const std::vector<std::int32_t> blocks(t.begin(), t.end());
    const auto seqs = c.sequence_count();
    const auto used = c.used_blocks();
    auto unchanged = [&] {
        return c.sequence_count() == seqs && c.used_blocks() == used && c.block_refs(blocks[0]) == 1u &&
               c.block_refs(blocks[1]) == 1u && c.block_refs(blocks[2]) == 1u;
    };
    const std::int32_t free_block[] = {blocks[0], 200};
    BOOST_CHECK_THROW((void)c.adopt(free_block, 8), vmmpp::invalid_argument);
    BOOST_TEST(unchanged());
    const std::int32_t twice[] = {blocks[0], blocks[0]};
    BOOST_CHECK_THROW((void)c.adopt(twice, 8), vmmpp::invalid_argument);
    BOOST_TEST(unchanged());
    const std::int32_t outside[] = {blocks[0], 4096};
    BOOST_CHECK_THROW((void)c.adopt(outside, 8), vmmpp::invalid_argument);
    BOOST_TEST(unchanged());
    BOOST_CHECK_THROW((void)c.adopt(blocks, 8), vmmpp::invalid_argument);  // 8 tokens fill 2 blocks, not 3
    BOOST_CHECK_THROW((void)c.adopt(blocks, 13), vmmpp::invalid_argument);
    BOOST_TEST(unchanged());
    BOOST_CHECK_THROW(c.release_block(200), vmmpp::invalid_argument);
    BOOST_TEST(unchanged());

    // Adopting a partial last block shares it copy-on-write, as fork.
    const auto b = c.adopt(blocks, 10);
    BOOST_TEST(c.tokens(b) == 10u);
    BOOST_TEST(c.block_refs(blocks[2]) == 2u);
    c.append(b, 1);
    BOOST_TEST(c.cow_copies() == 1u);
    BOOST_TEST(c.block_table(b)[2] != blocks[2]);
    const auto e = c.adopt({}, 0);
    BOOST_TEST(c.tokens(e) == 0u);
    // A block kept by another holder outlives its sequences.
    c.retain_block(blocks[0]);
    c.free(a);
    c.free(b);
    BOOST_TEST(c.block_refs(blocks[0]) == 1u);
    c.release_block(blocks[0]);
    BOOST_TEST(c.block_refs(blocks[0]) == 0u);
    BOOST_CHECK_THROW(c.release_block(blocks[0]), vmmpp::invalid_argument);
    c.free(e);
    BOOST_TEST(c.used_blocks() == 0u);
}

BOOST_AUTO_TEST_CASE(sequence_contiguous_refuses_sharing) {
    constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 8, .max_blocks = 64, .max_tokens_per_sequence = 64};
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::sequence_contiguous> c(g);
    const auto a = c.add_sequence();
    c.append(a, 8);
    const std::int32_t first = c.block_table(a)[0];
    const std::int32_t blocks[] = {first};
    try {
        (void)c.adopt(blocks, 8);
        BOOST_FAIL("adopt on sequence_contiguous did not throw");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(std::string(e.what()).find("adopt refused") != std::string::npos);
        BOOST_TEST(std::string(e.what()).find("sequence_contiguous") != std::string::npos);
    }
    BOOST_CHECK_THROW(c.retain_block(first), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(c.release_block(first), vmmpp::invalid_argument);  // would drop the sequence's own
    BOOST_TEST(c.sequence_count() == 1u);
    BOOST_TEST(c.block_refs(first) == 1u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(eviction_never_touches_live_blocks_and_keeps_the_bound, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    std::vector<vmmpp::seq_id> live;
    for (int i = 0; i < 6; ++i) {
        live.push_back(run_prompt(pc, iota_tokens(8, 1000 * (i + 1))));
    }
    BOOST_TEST(pc.cached_blocks() == 12u);
    BOOST_TEST(pc.clear().blocks.empty());
    BOOST_TEST(pc.evict_bytes(std::size_t{1} << 40).blocks.empty());
    for (int i = 0; i < 3; ++i) {
        pc.free(live[static_cast<std::size_t>(i)]);
    }
    const auto r = pc.clear();
    BOOST_TEST(r.blocks.size() == 6u);
    for (std::size_t i = 3; i < 6; ++i) {
        for (std::int32_t b : c.block_table(live[i])) {
            BOOST_TEST((std::find(r.blocks.begin(), r.blocks.end(), b) == r.blocks.end()));
            BOOST_TEST(c.block_refs(b) == 2u);
        }
        BOOST_TEST(kv_matches(c, live[i], iota_tokens(8, 1000 * static_cast<std::int32_t>(i + 1)), 8));
    }

    // The bound: at most 3 blocks' bytes kept for no sequence; the oldest go first.
    vmmpp::prefix_cache<typename Case::cache> bounded(c, {.max_cached_bytes = 3 * pc.block_bytes()});
    std::vector<std::int32_t> firsts;
    for (int i = 0; i < 5; ++i) {
        const auto s = run_prompt(bounded, iota_tokens(4, 50000 + 100 * i));
        firsts.push_back(c.block_table(s)[0]);
        bounded.free(s);
        BOOST_TEST(bounded.evictable_bytes() <= 3 * pc.block_bytes());
    }
    BOOST_TEST(bounded.cached_blocks() == 3u);
    BOOST_TEST(bounded.stats().evictions == 2u);
    BOOST_TEST(bounded.lookup(iota_tokens(4, 50000)) == 0u);      // oldest, evicted
    BOOST_TEST(bounded.lookup(iota_tokens(4, 50400)) == 4u);      // newest, kept
    for (auto s : live) {
        if (c.contains(s)) {
            c.free(s);
        }
    }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(lru_evicts_tails_first_and_hits_refresh, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const tokens_t system = iota_tokens(8, 7);  // a system prompt of 2 blocks
    tokens_t p1 = system, p2 = system;
    p1.insert(p1.end(), {1, 1, 1, 1});
    p2.insert(p2.end(), {2, 2, 2, 2});
    pc.free(run_prompt(pc, p1));
    pc.free(run_prompt(pc, p2));  // hits the system prompt: it is now newer than p1's tail
    BOOST_TEST(pc.cached_blocks() == 4u);
    // Single blocks (no page frees: they share pages with each other) go oldest first: p1's
    // tail, then p2's tail, then the system prompt's tail, then its head.
    const auto r1 = pc.evict(1);
    BOOST_TEST(r1.blocks.size() == 1u);
    BOOST_TEST(pc.lookup(p1) == 8u);
    BOOST_TEST(pc.lookup(p2) == 12u);
    const auto r2 = pc.evict(1);
    BOOST_TEST(pc.lookup(p2) == 8u);
    const auto r3 = pc.evict(1);
    BOOST_TEST(pc.lookup(system) == 4u);
    BOOST_TEST(r1.freed_page_bytes + r2.freed_page_bytes + r3.freed_page_bytes == 0u);
    const auto r4 = pc.evict(1);
    BOOST_TEST(r4.freed_page_bytes > 0u);  // the last block on its pages
    BOOST_TEST(c.pool().committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(page_aware_eviction_frees_whole_pages, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(paged);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const std::size_t page_bytes = c.pool().page_bytes();
    const std::size_t bt = c.geometry().block_tokens;
    // One sequence per block: every block of the span, so every page is full. Published in a
    // scattered order (stride 37), so the oldest blocks lie on many pages.
    const std::size_t n = c.geometry().max_blocks;
    std::vector<vmmpp::seq_id> seqs(n);
    std::vector<tokens_t> prompts(n);
    for (std::size_t i = 0; i < n; ++i) {
        seqs[i] = c.add_sequence();
        c.append(seqs[i], bt);
        BOOST_TEST_REQUIRE(c.block_table(seqs[i])[0] == static_cast<std::int32_t>(i));
        prompts[i] = iota_tokens(bt, static_cast<std::int32_t>(1000 * i));
        write_kv(c, seqs[i], prompts[i], 0);
    }
    for (std::size_t k = 0; k < n; ++k) {
        const std::size_t i = k * 37 % n;
        pc.publish(seqs[i], prompts[i]);
    }
    // Block 0 stays live: its pages cannot be freed, whatever else goes.
    for (std::size_t i = 1; i < n; ++i) {
        pc.free(seqs[i]);
    }
    const std::size_t committed = c.pool().committed_bytes();
    BOOST_TEST(committed == Case::layout::span_bytes(c.geometry()) / page_bytes * page_bytes);

    // The groups, worked out here from the layout's pieces: the blocks on each page block 0
    // does not touch; a group is as old as its newest block (its place in the publish order).
    std::vector<std::size_t> rank(n);
    for (std::size_t k = 0; k < n; ++k) {
        rank[k * 37 % n] = k;
    }
    auto pages_of = [&](std::int32_t b) {
        std::set<std::size_t> pages;
        Case::layout::for_each_piece(c.geometry(), static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
            for (std::size_t p = off / page_bytes; p <= (off + bytes - 1) / page_bytes; ++p) {
                pages.insert(p);
            }
        });
        return pages;
    };
    std::map<std::size_t, std::size_t> page_age;
    for (std::size_t b = 1; b < n; ++b) {
        for (std::size_t p : pages_of(static_cast<std::int32_t>(b))) {
            page_age[p] = std::max(page_age[p], rank[b]);
        }
    }
    for (std::size_t p : pages_of(0)) {
        page_age.erase(p);
    }
    std::size_t oldest_group = n;
    for (const auto& [p, age] : page_age) {
        oldest_group = std::min(oldest_group, age);
    }

    // Asked for one page: a whole group goes, the oldest, and exactly its pages come back.
    const auto r = pc.evict_bytes(page_bytes);
    std::size_t evicted_age = 0;
    for (std::int32_t b : r.blocks) {
        evicted_age = std::max(evicted_age, rank[static_cast<std::size_t>(b)]);
    }
    BOOST_TEST(evicted_age == oldest_group);
    BOOST_TEST(r.freed_page_bytes >= page_bytes);
    BOOST_TEST(r.freed_page_bytes % page_bytes == 0u);
    BOOST_TEST(committed - c.pool().committed_bytes() == r.freed_page_bytes);
    // Bytes back per block evicted: the block's size (the group's blocks fill its pages).
    BOOST_TEST(r.freed_page_bytes == r.blocks.size() * pc.block_bytes());
    BOOST_TEST((std::find(r.blocks.begin(), r.blocks.end(), 0) == r.blocks.end()));
    // Not simply the oldest blocks: those are scattered, the group's ids are consecutive.
    const auto [lo, hi] = std::minmax_element(r.blocks.begin(), r.blocks.end());
    BOOST_TEST(static_cast<std::size_t>(*hi - *lo + 1) == r.blocks.size());
    // The oldest blocks alone would free nothing: evict(k) for fewer blocks than a group takes
    // single blocks, oldest first.
    const std::size_t before = c.pool().committed_bytes();
    const auto singles = pc.evict(r.blocks.size() - 1);
    BOOST_TEST(singles.blocks.size() == r.blocks.size() - 1);
    BOOST_TEST(singles.freed_page_bytes == 0u);
    BOOST_TEST(c.pool().committed_bytes() == before);
    // Everything evictable: only block 0's pages stay committed.
    const auto rest = pc.clear();
    std::size_t block0_pages = 0;
    Case::layout::for_each_piece(c.geometry(), 0, [&](std::size_t off, std::size_t bytes) {
        block0_pages += (off + bytes - 1) / page_bytes - off / page_bytes + 1;
    });
    BOOST_TEST(c.pool().committed_bytes() == block0_pages * page_bytes);
    BOOST_TEST(r.freed_page_bytes + singles.freed_page_bytes + rest.freed_page_bytes ==
               committed - block0_pages * page_bytes);
    BOOST_TEST(kv_matches(c, seqs[0], prompts[0], bt));
    const auto s = pc.stats();
    BOOST_TEST(s.cached_blocks == 1u);
    BOOST_TEST(s.packed_floor_bytes == page_bytes);
    BOOST_TEST(s.idle_footprint_ratio == static_cast<double>(block0_pages));
    c.free(seqs[0]);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(events_name_the_keys, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c, {.record_events = true});
    const tokens_t prompt = iota_tokens(8, 3);
    const auto a = run_prompt(pc, prompt);
    const auto stored = pc.drain_events();
    BOOST_TEST_REQUIRE(stored.size() == 2u);
    BOOST_TEST((stored[0].kind == vmmpp::prefix_event_kind::stored));
    BOOST_TEST((stored[0].parent == vmmpp::root_block_key));
    BOOST_TEST((stored[1].parent == stored[0].key));
    BOOST_TEST(stored[0].block == c.block_table(a)[0]);
    BOOST_TEST((*pc.key_of(stored[1].block) == stored[1].key));
    BOOST_TEST(pc.drain_events().empty());
    pc.free(a);
    const auto r = pc.clear();
    const auto removed = pc.drain_events();
    BOOST_TEST_REQUIRE(removed.size() == 2u);
    for (std::size_t i = 0; i < 2; ++i) {
        BOOST_TEST((removed[i].kind == vmmpp::prefix_event_kind::removed));
        BOOST_TEST((removed[i].key == r.keys[i]));
        BOOST_TEST(removed[i].block == r.blocks[i]);
    }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(append_evicts_cached_blocks_when_refused, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const std::size_t bt = c.geometry().block_tokens, n = c.geometry().max_blocks;
    // Fill every block with cached prompts no sequence holds.
    for (std::size_t i = 0; i < n / 4; ++i) {
        pc.free(run_prompt(pc, iota_tokens(4 * bt, static_cast<std::int32_t>(100 * i))));
    }
    const auto keep = run_prompt(pc, iota_tokens(2 * bt, 900000));  // not enough room: evicted for it
    BOOST_TEST(c.free_blocks() == 0u);
    const auto s = c.add_sequence();
    BOOST_CHECK_THROW(c.append(s, 3 * bt), vmmpp::out_of_blocks);
    const auto before = pc.evictable_blocks();
    pc.append(s, 3 * bt);  // the prefix cache gives up cached blocks for it
    BOOST_TEST(c.tokens(s) == 3 * bt);
    BOOST_TEST(pc.evictable_blocks() == before - 3);
    BOOST_TEST(kv_matches(c, keep, iota_tokens(2 * bt, 900000), 2 * bt));
    // Nothing more to give: live blocks stay, the refusal comes through.
    const auto all = c.add_sequence();
    pc.append(all, (c.free_blocks() + pc.evictable_blocks()) * bt);
    BOOST_TEST(pc.evictable_blocks() == 0u);
    BOOST_CHECK_THROW(pc.append(all, 1), vmmpp::out_of_blocks);
    BOOST_TEST(kv_matches(c, keep, iota_tokens(2 * bt, 900000), 2 * bt));
    c.free(s);
    c.free(all);
    c.free(keep);
}

BOOST_AUTO_TEST_CASE(append_evicts_whole_pages_when_over_quota) {
    using budget_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    using case_t = kv_case<budget_config, vmmpp::block_major>;
    kv_factory<case_t> factory;
    factory.limit = 2 * page;  // two pages: 32 blocks of 128 KiB
    auto cache = factory.make(paged);
    auto& c = *cache;
    vmmpp::prefix_cache<case_t::cache> pc(c);
    const std::size_t bt = c.geometry().block_tokens;
    BOOST_TEST_REQUIRE(c.pool().page_bytes() == page);
    std::vector<vmmpp::seq_id> seqs;
    for (std::int32_t i = 0; i < 32; ++i) {
        seqs.push_back(run_prompt(pc, iota_tokens(bt, 100 * i)));
    }
    // Blocks 0..15 (page 0) stay live; page 1's blocks are cached for no sequence.
    for (std::size_t i = 16; i < 32; ++i) {
        pc.free(seqs[i]);
    }
    const auto s = c.add_sequence();
    BOOST_CHECK_THROW(c.append(s, 16 * bt), vmmpp::over_quota);  // 16 more blocks need a third page
    BOOST_TEST(c.free_blocks() > 16u);                          // ids there are: the quota refuses
    pc.append(s, 16 * bt);
    BOOST_TEST(pc.evictable_blocks() == 0u);
    BOOST_TEST(pc.stats().evictions == 16u);
    BOOST_TEST(c.pool().committed_bytes() == 2 * page);
    for (std::size_t i = 0; i < 16; ++i) {
        BOOST_TEST(kv_matches(c, seqs[i], iota_tokens(bt, 100 * static_cast<std::int32_t>(i)), bt));
    }
    // Nothing left to evict: the quota's refusal comes through, the sequence unchanged.
    BOOST_CHECK_THROW(pc.append(s, 1), vmmpp::over_quota);
    BOOST_TEST(c.tokens(s) == 16 * bt);
}

// relocate_block's refusals name the block and its reference count and change nothing;
// take_block refuses as append does (no free id, the quota), strong; a block with no free id
// below it stays where it is.
BOOST_AUTO_TEST_CASE(relocate_block_refuses_shared_blocks_and_take_block_is_strong) {
    using budget_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    using case_t = kv_case<budget_config, vmmpp::block_major>;
    kv_factory<case_t> factory;
    factory.limit = 2 * page;  // two pages: 32 blocks of 128 KiB
    auto cache = factory.make(paged);
    auto& c = *cache;
    const std::size_t bt = c.geometry().block_tokens;
    const auto s = c.add_sequence();
    c.append(s, 2 * bt);  // blocks 0, 1
    const auto forked = c.fork(s);
    auto no_op = [](std::int32_t) noexcept {};
    try {
        (void)vmmpp::relocate_block(c, 1, c.stream(), no_op);
        BOOST_FAIL("a block two sequences hold moved");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(std::string(e.what()).find("block 1 has 2 references") != std::string::npos);
    }
    c.free(forked);
    BOOST_CHECK_THROW((void)vmmpp::relocate_block(c, 5, c.stream(), no_op), vmmpp::invalid_argument);    // free
    BOOST_CHECK_THROW((void)vmmpp::relocate_block(c, 9999, c.stream(), no_op), vmmpp::invalid_argument);  // out of range
    // No free id below block 1: it stays, and the id taken to find out goes back.
    BOOST_TEST(vmmpp::relocate_block(c, 1, c.stream(), no_op) == 1);
    BOOST_TEST(c.used_blocks() == 2u);
    BOOST_TEST(c.block_refs(2) == 0u);
    BOOST_TEST(c.pool().committed_bytes() == page);

    // The quota: 16 blocks fill page 0, one more needs page 1, then page 2 is refused.
    c.append(s, 30 * bt);  // blocks 0..31: both pages
    const std::size_t used = c.used_blocks(), committed = c.pool().committed_bytes();
    BOOST_CHECK_THROW((void)c.take_block(c.stream()), vmmpp::over_quota);
    BOOST_TEST(c.used_blocks() == used);
    BOOST_TEST(c.pool().committed_bytes() == committed);
    BOOST_TEST(c.block_refs(32) == 0u);
    c.free(s);
    // Taken: the lowest free id, one reference, released as retain_block's.
    const std::int32_t b = c.take_block(c.stream());
    BOOST_TEST(b == 0);
    BOOST_TEST(c.block_refs(b) == 1u);
    c.release_block(b);
    BOOST_TEST(c.used_blocks() == 0u);
    BOOST_TEST(c.pool().committed_bytes() == 0u);
}

// A compaction whose destination needs a page the quota refuses: compact() throws over_quota
// with nothing changed; free, which compacts on its own, stops quietly; with room, the blocks
// move and the pages above go back.
BOOST_AUTO_TEST_CASE(compaction_refused_memory_stops_quietly_in_free) {
    using budget_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    using case_t = kv_case<budget_config, vmmpp::block_major>;
    kv_factory<case_t> factory;
    factory.limit = 4 * page;  // 16 blocks of 128 KiB a page
    auto cache = factory.make(paged);
    auto& c = *cache;
    vmmpp::prefix_cache<case_t::cache> pc(c);
    const std::size_t bt = c.geometry().block_tokens;
    const auto low = c.add_sequence();
    c.append(low, 16 * bt);  // page 0
    const auto live = c.add_sequence();
    c.append(live, 16 * bt);  // page 1, live throughout
    const auto first = run_prompt(pc, iota_tokens(bt, 5000));  // block 32, page 2
    const auto pad = c.add_sequence();
    c.append(pad, 15 * bt);
    const auto second = run_prompt(pc, iota_tokens(bt, 6000));  // block 48, page 3
    BOOST_TEST_REQUIRE(c.block_table(first)[0] == 32);
    BOOST_TEST_REQUIRE(c.block_table(second)[0] == 48);
    c.free(low);
    c.free(pad);
    c.free(first);  // directly: cached, nothing compacted yet
    c.free(second);
    BOOST_TEST_REQUIRE(c.pool().committed_bytes() == 3 * page);
    (void)factory.budget->set_limit(3 * page);  // moving both into page 0 would free 2 pages, but needs page 0 first

    BOOST_CHECK_THROW((void)pc.compact(), vmmpp::over_quota);
    BOOST_TEST(*pc.block_of(*pc.key_of(32)) == 32);
    BOOST_TEST(pc.key_of(48).has_value());
    BOOST_TEST(c.used_blocks() == 18u);
    BOOST_TEST(c.pool().committed_bytes() == 3 * page);
    const auto fork = c.fork(live);
    vmmpp::eviction_result r;
    BOOST_CHECK_NO_THROW(r = pc.free(fork));  // frees no block, compacts, is refused: quietly
    BOOST_TEST(r.moved_blocks == 0u);
    BOOST_TEST(c.used_blocks() == 18u);

    (void)factory.budget->set_limit(4 * page);
    r = pc.compact();
    BOOST_TEST(r.moved_blocks == 2u);
    BOOST_TEST(r.freed_page_bytes == page);  // pages 2 and 3 back, page 0 taken
    BOOST_TEST(c.pool().committed_bytes() == 2 * page);
    BOOST_TEST(pc.lookup(iota_tokens(bt, 5000)) == bt);
    BOOST_TEST(pc.lookup(iota_tokens(bt, 6000)) == bt);
    BOOST_TEST(pc.key_of(0).has_value());
    BOOST_TEST(pc.key_of(1).has_value());
    c.free(live);
}

namespace {

using key_pair = std::pair<std::uint64_t, std::uint64_t>;
key_pair pair_of(const vmmpp::block_key& k) { return {k.hi, k.lo}; }

/// The reference model of the randomized run: which keys are cached, and the tokens from the
/// prompt's first up to the end of each key's block.
struct prefix_model {
    std::map<key_pair, tokens_t> cached;
    std::size_t block_tokens;

    std::vector<std::pair<vmmpp::block_key, tokens_t>> blocks_of(const tokens_t& t, std::span<const std::uint64_t> extra) const {
        std::vector<std::pair<vmmpp::block_key, tokens_t>> out;
        vmmpp::for_each_block_key(t, block_tokens, extra, [&](std::size_t i, const vmmpp::block_key& k) {
            out.push_back({k, tokens_t(t.begin(), t.begin() + static_cast<std::ptrdiff_t>((i + 1) * block_tokens))});
            return true;
        });
        return out;
    }
    std::size_t lookup(const tokens_t& t, std::span<const std::uint64_t> extra) const {
        std::size_t n = 0;
        for (const auto& [k, prefix] : blocks_of(t, extra)) {
            if (!cached.contains(pair_of(k))) {
                break;
            }
            n += block_tokens;
        }
        return n;
    }
};

} // namespace

// The bound's eviction follows the policy alone: evict(k) for as many blocks as a whole-page
// group holds still takes the k oldest (before compaction, evict took a newer group whole, which
// is what cost the hit rate of bench/results/prefix-host-2026-12-07), and compaction then moves
// the survivors down so the pages above go back, keys, bytes and order intact.
BOOST_AUTO_TEST_CASE_TEMPLATE(eviction_is_oldest_first_and_compaction_returns_the_pages, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(paged);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const std::size_t page_bytes = c.pool().page_bytes();
    const std::size_t bt = c.geometry().block_tokens;
    const std::size_t n = c.geometry().max_blocks;
    std::vector<vmmpp::seq_id> seqs(n);
    std::vector<tokens_t> prompts(n);
    std::vector<std::size_t> rank(n);  // place in the publish order (stride 37: scattered over the pages)
    for (std::size_t i = 0; i < n; ++i) {
        seqs[i] = c.add_sequence();
        c.append(seqs[i], bt);
        prompts[i] = iota_tokens(bt, static_cast<std::int32_t>(1000 * i));
        write_kv(c, seqs[i], prompts[i], 0);
    }
    for (std::size_t k = 0; k < n; ++k) {
        rank[k * 37 % n] = k;
        pc.publish(seqs[k * 37 % n], prompts[k * 37 % n]);
    }
    for (std::size_t i = 1; i < n; ++i) {
        c.free(seqs[i]);  // directly: nothing compacted yet; block 0 stays live
    }
    // More blocks than a page holds: before, evict took whole-page groups (newer) first.
    const std::size_t k = 2 * page_bytes / pc.block_bytes() + 1;
    const auto r = pc.evict(k);
    BOOST_TEST_REQUIRE(r.blocks.size() == k);
    for (std::int32_t b : r.blocks) {
        BOOST_TEST(rank[static_cast<std::size_t>(b)] <= k);  // ranks 1..k (rank 0's block 0 is live)
    }
    BOOST_TEST(r.moved_blocks == 0u);  // evict alone never moves

    // Every other survivor evicted too, oldest first: holes all over; then compaction.
    const auto more = pc.evict((n - 1 - k) / 2);
    BOOST_TEST(more.blocks.size() == (n - 1 - k) / 2);
    const std::size_t live = c.used_blocks();
    std::map<key_pair, std::size_t> owner;  // key -> prompt
    for (std::size_t i = 0; i < n; ++i) {
        std::vector<vmmpp::block_key> keys;
        vmmpp::for_each_block_key(prompts[i], bt, {}, [&](std::size_t, const vmmpp::block_key& key) {
            keys.push_back(key);
            return true;
        });
        owner[pair_of(keys[0])] = i;
    }
    std::vector<vmmpp::block_key> lru_before;
    for (std::size_t i = 0; i < n; ++i) {  // the survivors' keys, oldest first
        const std::size_t id = i * 37 % n;
        std::vector<vmmpp::block_key> keys;
        vmmpp::for_each_block_key(prompts[id], bt, {}, [&](std::size_t, const vmmpp::block_key& key) {
            keys.push_back(key);
            return true;
        });
        if (id != 0 && pc.block_of(keys[0])) {
            lru_before.push_back(keys[0]);
        }
    }
    const std::size_t committed = c.pool().committed_bytes();
    const auto moved = pc.compact();
    BOOST_TEST(moved.moved_blocks > 0u);
    BOOST_TEST(moved.blocks.empty());
    BOOST_TEST(c.used_blocks() == live);
    BOOST_TEST(committed - c.pool().committed_bytes() == moved.freed_page_bytes);
    // As packed: as many pages as blocks 0 .. live-1 touch stay committed.
    std::set<std::size_t> pages;
    for (std::size_t b = 0; b < live; ++b) {
        Case::layout::for_each_piece(c.geometry(), static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
            for (std::size_t p = off / page_bytes; p <= (off + bytes - 1) / page_bytes; ++p) {
                pages.insert(p);
            }
        });
    }
    BOOST_TEST(c.pool().committed_bytes() == pages.size() * page_bytes);
    BOOST_TEST(pc.stats().moves == moved.moved_blocks);
    BOOST_TEST(pc.compact().moved_blocks == 0u);  // nothing left to gain
    // Every survivor still cached under its key, its bytes its tokens', the order as before.
    pc.for_each_cached([&](const vmmpp::block_key& key, std::int32_t b) {
        BOOST_TEST((*pc.key_of(b) == key));
        const tokens_t& prompt = prompts[owner.at(pair_of(key))];
        for (std::size_t t = 0; t < bt; ++t) {
            const auto v = kv_value(prompt, t);
            BOOST_TEST((read_token(c, std::int64_t{b} * static_cast<std::int64_t>(bt) + static_cast<std::int64_t>(t)) ==
                        std::pair{v, v}));
        }
    });
    BOOST_TEST(kv_matches(c, seqs[0], prompts[0], bt));
    for (const vmmpp::block_key& key : lru_before) {
        const auto one = pc.evict(1);
        BOOST_TEST_REQUIRE(one.keys.size() == 1u);
        BOOST_TEST((one.keys[0] == key));
    }
    BOOST_TEST(pc.evictable_blocks() == 0u);
    c.free(seqs[0]);
}

// compaction's plan walks the cached ids from the top (bench/results/prefix-cost-host-2026-12-07)
// instead of every id: on random states it plans what a walk over every id plans, and leaves
// its page scratch all zero.
BOOST_AUTO_TEST_CASE_TEMPLATE(compaction_plan_over_cached_ids_is_the_full_scans, Case, prefix_cases) {
    using cache_type = typename Case::cache;
    using layout_type = typename cache_type::layout_type;
    constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 32, .head_dim = 256, .type = vmmpp::dtype::f16,
                                   .block_tokens = 4, .max_blocks = 192};
    // The plan as it was: every id from the top down, a fresh vector of page counts.
    const auto reference = [](const cache_type& c, std::size_t page_bytes, std::size_t max_moves, auto movable) {
        const auto n = static_cast<std::int32_t>(c.geometry().max_blocks);
        const auto next_free = [&](std::int32_t id) {
            while (id < n && c.block_refs(id) != 0) {
                ++id;
            }
            return id;
        };
        vmmpp::detail::compaction_plan plan;
        std::int32_t lo = next_free(0), hi = n - 1;
        while (plan.moves.size() < max_moves) {
            while (hi > lo && (c.block_refs(hi) == 0 || !movable(hi))) {
                --hi;
            }
            if (hi <= lo) {
                break;
            }
            plan.moves.push_back({hi, lo});
            --hi;
            lo = next_free(lo + 1);
        }
        std::vector<std::uint32_t> users((layout_type::span_bytes(c.geometry()) + page_bytes - 1) / page_bytes, 0);
        for (std::int32_t id = 0; id < n; ++id) {
            if (c.block_refs(id) != 0) {
                vmmpp::detail::for_each_block_page<layout_type>(c.geometry(), page_bytes, id, [&](std::size_t p) { ++users[p]; });
            }
        }
        std::ptrdiff_t freed = 0, best = 0;
        std::size_t best_moves = 0;
        for (std::size_t i = 0; i < plan.moves.size(); ++i) {
            vmmpp::detail::for_each_block_page<layout_type>(c.geometry(), page_bytes, plan.moves[i].from,
                                                            [&](std::size_t p) { freed += --users[p] == 0 ? 1 : 0; });
            vmmpp::detail::for_each_block_page<layout_type>(c.geometry(), page_bytes, plan.moves[i].to,
                                                            [&](std::size_t p) { freed -= users[p]++ == 0 ? 1 : 0; });
            if (freed > best) {
                best = freed;
                best_moves = i + 1;
            }
        }
        plan.moves.resize(best_moves);
        plan.freed_page_bytes = static_cast<std::size_t>(best) * page_bytes;
        return plan;
    };
    std::size_t planned_moves = 0, states_with_candidates = 0;
    std::vector<std::uint32_t> scratch;
    for (unsigned seed = 1; seed <= 40; ++seed) {
        BOOST_TEST_CONTEXT("seed " << seed) {
            std::mt19937 rng(seed);
            kv_factory<Case> factory;
            auto cache = factory.make(g);
            auto& c = *cache;
            // Sequences of 1-12 blocks, some freed: holes; a random half of the live blocks
            // "cached", a third of those held by a second sequence (not movable).
            std::vector<vmmpp::seq_id> seqs;
            for (int i = 0; i < 16; ++i) {
                seqs.push_back(c.add_sequence());
                c.append(seqs.back(), (1 + rng() % 12) * g.block_tokens);
            }
            std::set<std::int32_t> cached;
            for (std::size_t i = 0; i < seqs.size(); ++i) {
                if (rng() % 3 == 0) {
                    c.free(seqs[i]);
                    continue;
                }
                for (std::int32_t b : c.block_table(seqs[i])) {
                    if (rng() % 2 == 0) {
                        cached.insert(b);
                    }
                }
            }
            std::set<std::int32_t> held;
            for (std::int32_t b : cached) {
                if (rng() % 3 == 0) {
                    held.insert(b);
                }
            }
            const auto movable = [&](std::int32_t b) { return c.block_refs(b) == 1 && cached.contains(b) && !held.contains(b); };
            const std::size_t page_bytes = c.pool().page_bytes();
            std::int32_t lowest_free = 0;
            while (c.block_refs(lowest_free) != 0) {
                ++lowest_free;
            }
            states_with_candidates += std::any_of(cached.begin(), cached.end(), [&](std::int32_t b) {
                return b > lowest_free && movable(b);
            }) ? 1 : 0;
            for (std::size_t max_moves : {std::size_t{1}, std::size_t{5}, std::size_t{256}}) {
                const auto want = reference(c, page_bytes, max_moves, movable);
                const auto got = vmmpp::detail::plan_compaction(c, page_bytes, max_moves, cached, scratch, movable);
                BOOST_TEST_REQUIRE(got.moves.size() == want.moves.size());
                for (std::size_t i = 0; i < want.moves.size(); ++i) {
                    BOOST_TEST(got.moves[i].from == want.moves[i].from);
                    BOOST_TEST(got.moves[i].to == want.moves[i].to);
                }
                BOOST_TEST(got.freed_page_bytes == want.freed_page_bytes);
                BOOST_TEST(std::all_of(scratch.begin(), scratch.end(), [](std::uint32_t u) { return u == 0; }));
                planned_moves += got.moves.size();
            }
        }
    }
    // The states gave the walk blocks to consider (moves that free a page are planned in some
    // layouts only: in layer_major 32 blocks share a page of each region, and random holes
    // seldom empty one).
    BOOST_TEST(states_with_candidates > 20u);
    BOOST_TEST_MESSAGE("moves planned: " << planned_moves);
}

// Cached blocks sleep and wake with their cache: while it sleeps (its memory given back) keys and
// lookups stay, eviction and compaction are refused or do nothing, and after wake an attach reads
// the blocks' bytes as they were.
BOOST_AUTO_TEST_CASE_TEMPLATE(cached_blocks_sleep_and_wake_with_the_cache, Case, prefix_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(paged);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const std::size_t bt = c.geometry().block_tokens;
    const tokens_t p = iota_tokens(4 * bt + 3, 7);  // 4 full blocks and 3 tokens
    const vmmpp::seq_id s = c.add_sequence();
    c.append(s, p.size());
    write_kv(c, s, p, 0);
    BOOST_TEST(pc.publish(s, p) == 4u);
    pc.free(s);  // the 4 full blocks stay cached, no sequence holds them
    BOOST_TEST(c.used_blocks() == 4u);
    std::vector<std::byte> host(c.sleep_bytes());
    (void)c.sleep(host);
    BOOST_TEST(c.asleep());
    BOOST_TEST(c.pool().committed_bytes() == 0u);
    BOOST_TEST(pc.lookup(p) == 4 * bt);
    BOOST_CHECK_THROW((void)pc.evict(1), vmmpp::cache_asleep);  // nothing changed
    BOOST_TEST(pc.cached_blocks() == 4u);
    BOOST_TEST(pc.compact().moved_blocks == 0u);
    (void)c.wake();
    const vmmpp::attached_sequence a = pc.attach(p);
    BOOST_TEST(a.cached_tokens == 4 * bt);
    BOOST_TEST(kv_matches(c, a.seq, p, 4 * bt));
    pc.free(a.seq);
    BOOST_TEST(pc.clear().blocks.size() == 4u);
    BOOST_TEST(c.used_blocks() == 0u);
}

// copy_blocks and cached blocks: a cached block is a source like any live block (its bytes land
// in the other cache), never a destination (it is shared with the prefix cache: its bytes must
// stay its tokens'), and the refusal copies nothing.
BOOST_AUTO_TEST_CASE_TEMPLATE(copy_blocks_reads_cached_blocks_and_never_writes_them, Case, prefix_cases) {
    kv_factory<Case> factory, other_factory;
    auto cache = factory.make(paged);
    auto other = other_factory.make(paged);
    auto& c = *cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);
    const std::size_t bt = c.geometry().block_tokens;
    const tokens_t p = iota_tokens(2 * bt, 11);
    const vmmpp::seq_id s = c.add_sequence();
    c.append(s, p.size());
    write_kv(c, s, p, 0);
    BOOST_TEST(pc.publish(s, p) == 2u);
    const std::vector<std::int32_t> cached(c.block_table(s).begin(), c.block_table(s).end());
    // Into another cache: the bytes come along.
    const vmmpp::seq_id t = other->add_sequence();
    other->append(t, p.size());
    const std::vector<std::int32_t> to(other->block_table(t).begin(), other->block_table(t).end());
    vmmpp::copy_blocks(c, cached, *other, to);
    BOOST_TEST(kv_matches(*other, t, p, p.size()));
    // Into a cached block: refused, nothing written.
    const vmmpp::seq_id u = c.add_sequence();
    c.append(u, bt);
    write_kv(c, u, iota_tokens(bt, 900), 0);
    const std::int32_t from[1] = {c.block_table(u)[0]};
    const std::int32_t into[1] = {cached[1]};
    BOOST_CHECK_THROW(vmmpp::copy_blocks(c, from, c, into), vmmpp::invalid_argument);
    pc.free(s);
    const auto a = pc.attach(p);  // the cached bytes as written
    BOOST_TEST(a.cached_tokens == p.size());
    BOOST_TEST(kv_matches(c, a.seq, p, p.size()));
    c.free(u);
    pc.free(a.seq);
    other->free(t);
}

// detail::block_page_map (which ids touch a page, from the layout's arithmetic) against every
// block's pages from Layout::for_each_piece, in geometries where a page holds many blocks, a
// block many pages, pages straddle regions, block tensors not dividing the page, one block.
BOOST_AUTO_TEST_CASE_TEMPLATE(block_page_map_is_the_pieces_pages, Case, prefix_cases) {
    using layout_type = typename Case::cache::layout_type;
    const vmmpp::kv_geometry geometries[] = {
        small, paged,
        {.layers = 3, .kv_heads = 1, .head_dim = 96, .type = vmmpp::dtype::f16, .block_tokens = 5, .max_blocks = 77},
        {.layers = 1, .kv_heads = 1, .head_dim = 64, .type = vmmpp::dtype::f16, .block_tokens = 4, .max_blocks = 1},
        {.layers = 4, .kv_heads = 1, .head_dim = 576, .type = vmmpp::dtype::bf16, .block_tokens = 16, .max_blocks = 300},
    };
    std::size_t checked = 0;
    for (const vmmpp::kv_geometry& g : geometries) {
        try {
            layout_type::validate(g);
        } catch (const vmmpp::invalid_argument&) {
            continue;  // mla: kv_heads 1 only
        }
        for (std::size_t page_bytes : {std::size_t{4096}, std::size_t{3 * 4096}, std::size_t{65536}, std::size_t{2} << 20}) {
            BOOST_TEST_CONTEXT("blocks " << g.max_blocks << ", page " << page_bytes) {
                const std::size_t pages = (layout_type::span_bytes(g) + page_bytes - 1) / page_bytes;
                std::vector<std::set<std::int32_t>> want(pages);
                for (std::uint32_t b = 0; b < g.max_blocks; ++b) {
                    vmmpp::detail::for_each_block_page<layout_type>(g, page_bytes, static_cast<std::int32_t>(b),
                                                                    [&](std::size_t p) { want.at(p).insert(static_cast<std::int32_t>(b)); });
                }
                const vmmpp::detail::block_page_map<layout_type> map(g, page_bytes);
                for (std::size_t p = 0; p < pages; ++p) {
                    std::set<std::int32_t> got;
                    BOOST_TEST(map.for_each_block_on_page(p, [&](std::int32_t b) { got.insert(b); return true; }));
                    BOOST_TEST((got == want[p]), "page " << p);
                    if (!want[p].empty()) {  // stopping: after the first id, nothing more
                        std::size_t calls = 0;
                        BOOST_TEST(!map.for_each_block_on_page(p, [&](std::int32_t) { ++calls; return false; }));
                        BOOST_TEST(calls == 1u);
                    }
                    ++checked;
                }
            }
        }
    }
    BOOST_TEST(checked > 1000u);
}

// The pages each eviction frees, from the evicted block's own pages (detail::eviction_pages, what
// evict, trim and append's eviction use), against the full view over every evictable block
// (detail::page_groups, what they used before): random states of live, cached-and-held and
// evictable blocks, evicted in a random order, compared after every eviction.
BOOST_AUTO_TEST_CASE_TEMPLATE(eviction_pages_are_the_full_views, Case, prefix_cases) {
    using cache_type = typename Case::cache;
    const vmmpp::kv_geometry geometries[] = {
        // a block tensor of 32 KiB (a 2 MiB page: 16 blocks of block_major, 64 of a region)
        {.layers = 2, .kv_heads = 1, .head_dim = 1024, .type = vmmpp::dtype::f16, .block_tokens = 16, .max_blocks = 384},
        // 18 KiB: pieces across page boundaries
        {.layers = 2, .kv_heads = 1, .head_dim = 576, .type = vmmpp::dtype::bf16, .block_tokens = 16, .max_blocks = 320},
    };
    std::size_t evictions = 0, freed_total = 0, states_freeing = 0;
    for (const vmmpp::kv_geometry& g : geometries) {
        for (unsigned seed = 1; seed <= 30; ++seed) {
            BOOST_TEST_CONTEXT("blocks " << g.max_blocks << ", seed " << seed) {
                std::mt19937 rng(seed);
                kv_factory<Case> factory;
                auto cache = factory.make(g);
                auto& c = *cache;
                // Sequences of 1-16 blocks; a random part of their blocks "cached" (one more
                // reference, as prefix_cache's); some sequences freed, so their cached blocks
                // have that reference alone (evictable), the rest held.
                std::vector<vmmpp::seq_id> seqs;
                for (int i = 0; i < 24; ++i) {
                    seqs.push_back(c.add_sequence());
                    c.append(seqs.back(), (1 + rng() % 16) * g.block_tokens);
                }
                const unsigned cached_share = 1 + rng() % 4;  // of 4
                std::vector<std::int32_t> order;  // the cached blocks, then those evictable
                for (vmmpp::seq_id s : seqs) {
                    for (std::int32_t b : c.block_table(s)) {
                        if (rng() % 4 < cached_share) {
                            c.retain_block(b);
                            order.push_back(b);
                        }
                    }
                }
                for (vmmpp::seq_id s : seqs) {
                    if (rng() % 3 != 0) {
                        c.free(s);
                    }
                }
                std::erase_if(order, [&](std::int32_t b) { return c.block_refs(b) != 1; });
                std::shuffle(order.begin(), order.end(), rng);
                const std::size_t page_bytes = c.pool().page_bytes();
                vmmpp::detail::page_groups<cache_type> want(c, page_bytes, order, false);
                vmmpp::detail::eviction_pages<cache_type> got(g, page_bytes);
                const std::size_t n = order.empty() || rng() % 2 == 0 ? order.size() : 1 + rng() % order.size();
                std::size_t freed = 0;
                for (std::size_t i = 0; i < n; ++i) {
                    c.release_block(order[i]);
                    const std::size_t w = want.evicted(order[i]);
                    BOOST_TEST(got.freed_by(c, order[i]) == w, "eviction " << i << " of block " << order[i]);
                    freed += w;
                    ++evictions;
                }
                freed_total += freed;
                states_freeing += freed != 0 ? 1 : 0;
            }
        }
    }
    BOOST_TEST(evictions > 500u);
    BOOST_TEST(states_freeing > 10u);  // of 60
    BOOST_TEST_MESSAGE("evictions " << evictions << ", freed " << freed_total << " bytes");
}

// A pool whose span is committed for good (static_config's growth, here on the host) frees
// nothing by packing: compaction leaves the cached blocks where they are (no copies).
BOOST_AUTO_TEST_CASE(compaction_moves_nothing_in_a_committed_span) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::preallocated, vmmpp::unlimited>;
    vmmpp::kv_cache<config, vmmpp::block_major> c(paged);
    vmmpp::prefix_cache<vmmpp::kv_cache<config, vmmpp::block_major>> pc(c);
    const std::size_t bt = c.geometry().block_tokens;
    const std::size_t n = c.geometry().max_blocks;
    std::vector<vmmpp::seq_id> seqs(n);
    for (std::size_t i = 0; i < n; ++i) {
        seqs[i] = c.add_sequence();
        c.append(seqs[i], bt);
        const tokens_t prompt = iota_tokens(bt, static_cast<std::int32_t>(1000 * i));
        write_kv(c, seqs[i], prompt, 0);
        pc.publish(seqs[i], prompt);
    }
    for (std::size_t i = 0; i < n; ++i) {
        c.free(seqs[i]);
    }
    BOOST_TEST(pc.evict(n / 2).blocks.size() == n / 2);  // the oldest half: ids 0 .. n/2-1
    const std::size_t committed = c.pool().committed_bytes();
    BOOST_TEST(committed >= vmmpp::block_major::span_bytes(c.geometry()));
    const auto r = pc.compact();
    BOOST_TEST(r.moved_blocks == 0u);
    BOOST_TEST(r.freed_page_bytes == 0u);
    BOOST_TEST(pc.stats().moves == 0u);
    BOOST_TEST(c.pool().committed_bytes() == committed);
    BOOST_TEST(pc.cached_blocks() == n - n / 2);
    pc.for_each_cached([&](const vmmpp::block_key&, std::int32_t b) { BOOST_TEST(static_cast<std::size_t>(b) >= n / 2); });
}

// Requests with shared prefixes (system prompts, multi-turn continuations, adapters), random
// attach/append/publish/free/evict, every token's KV written into its slot. After every step:
// the prefix cache's keys are the model's, every cached block's bytes are its tokens' KV, every
// live sequence's bytes are its tokens' KV, reference counts are the live tables' plus the cache's,
// evictions took only blocks no sequence held, and lookup and attach agree with the model;
// compaction (free, trim, compact) moved cached blocks and their bytes came along.
BOOST_AUTO_TEST_CASE_TEMPLATE(randomized_against_a_model, Case, prefix_cases) {
    // Blocks of 256 KiB, 8 a 2 MiB page (layer_major: pieces of 64 KiB, 32 blocks a page of a
    // region), so frees and evictions empty pages and compaction has pages to win.
    constexpr vmmpp::kv_geometry rnd{.layers = 2, .kv_heads = 32, .head_dim = 256, .type = vmmpp::dtype::f16,
                                     .block_tokens = 4, .max_blocks = 192};
    std::uint64_t moves_in_all_seeds = 0;
    for (unsigned seed : {1u, 2u, 3u, 4u, 5u}) {
        BOOST_TEST_CONTEXT("seed " << seed) {
            std::mt19937 rng(seed);
            auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
            kv_factory<Case> factory;
            auto cache = factory.make(rnd);
            auto& c = *cache;
            const std::size_t bt = c.geometry().block_tokens, page_bytes = c.pool().page_bytes();
            vmmpp::prefix_cache_options options{.record_events = true};
            if (seed % 2 == 0) {
                options.max_cached_bytes = 40 * rnd.block_bytes();
            }
            vmmpp::prefix_cache<typename Case::cache> pc(c, options);
            prefix_model model{{}, bt};
            struct live_seq {
                tokens_t tokens;
                std::vector<std::uint64_t> extra;
            };
            std::map<vmmpp::seq_id, live_seq> live;
            std::vector<live_seq> finished;
            auto random_tokens = [&](std::size_t n) {
                tokens_t t(n);
                for (auto& x : t) {
                    x = static_cast<std::int32_t>(pick(5));
                }
                return t;
            };
            std::vector<tokens_t> systems;
            for (int i = 0; i < 3; ++i) {
                systems.push_back(random_tokens(4 + pick(9)));
            }
            auto live_blocks = [&] {
                std::map<std::int32_t, std::uint32_t> held;
                for (const auto& [id, s] : live) {
                    for (std::int32_t b : c.block_table(id)) {
                        ++held[b];
                    }
                }
                return held;
            };
            // The events since the last step: stored keys must be what was published (the model
            // learns them at publish), removed ones leave the model and held no sequence.
            std::map<std::int32_t, std::uint32_t> held_before;
            auto take_events = [&] {
                for (const vmmpp::prefix_event& e : pc.drain_events()) {
                    if (e.kind == vmmpp::prefix_event_kind::removed) {
                        BOOST_TEST(model.cached.erase(pair_of(e.key)) == 1u);
                        BOOST_TEST(!held_before.contains(e.block));
                    } else {
                        BOOST_TEST(model.cached.contains(pair_of(e.key)));
                    }
                }
            };
            auto publish = [&](vmmpp::seq_id id) {
                const live_seq& s = live.at(id);
                for (auto& [k, prefix] : model.blocks_of(s.tokens, s.extra)) {
                    model.cached.emplace(pair_of(k), prefix);  // an existing key keeps its tokens: the same
                }
                pc.publish(id, s.tokens, s.extra);
                for (auto& [k, prefix] : model.blocks_of(s.tokens, s.extra)) {
                    BOOST_TEST(pc.block_of(k).has_value());  // a live sequence's blocks are never evicted
                }
            };
            auto check = [&] {
                take_events();
                BOOST_TEST(pc.cached_blocks() == model.cached.size());
                std::set<std::int32_t> cached_ids;
                pc.for_each_cached([&](const vmmpp::block_key& k, std::int32_t b) {
                    cached_ids.insert(b);
                    const auto it = model.cached.find(pair_of(k));
                    BOOST_TEST_REQUIRE((it != model.cached.end()));
                    const tokens_t& prefix = it->second;
                    for (std::size_t t = 0; t < bt; ++t) {
                        const auto v = kv_value(prefix, prefix.size() - bt + t);
                        BOOST_TEST((read_token(c, std::int64_t{b} * static_cast<std::int64_t>(bt) + static_cast<std::int64_t>(t)) ==
                                    std::pair{v, v}));
                    }
                });
                const auto held = live_blocks();
                std::size_t used = 0;
                for (std::int32_t b = 0; b < static_cast<std::int32_t>(rnd.max_blocks); ++b) {
                    const auto h = held.contains(b) ? held.at(b) : 0u;
                    BOOST_TEST(c.block_refs(b) == h + (cached_ids.contains(b) ? 1u : 0u));
                    used += c.block_refs(b) > 0 ? 1 : 0;
                }
                BOOST_TEST(c.used_blocks() == used);
                for (const auto& [id, s] : live) {
                    BOOST_TEST(kv_matches(c, id, s.tokens, s.tokens.size()));
                }
                BOOST_TEST(pc.evictable_bytes() <= options.max_cached_bytes);
            };
            auto append = [&](vmmpp::seq_id id, std::size_t n) {
                try {
                    pc.append(id, n);
                    return true;
                } catch (const vmmpp::out_of_blocks&) {
                    BOOST_TEST(pc.evictable_blocks() == 0u);  // refused only once nothing was left
                    return false;
                }
            };
            std::size_t moved = 0;  // by compact() here
            for (int step = 0; step < 300; ++step) {
                held_before = live_blocks();
                const std::size_t op = pick(100);
                if (op < 35 || live.empty()) {  // a new request
                    live_seq s;
                    const std::size_t kind = pick(10);
                    if (kind < 5) {
                        s.tokens = systems[pick(systems.size())];
                        const tokens_t tail = random_tokens(pick(11));
                        s.tokens.insert(s.tokens.end(), tail.begin(), tail.end());
                    } else if (kind < 8 && !finished.empty()) {
                        s = finished[pick(finished.size())];  // the next turn of a conversation
                        const tokens_t tail = random_tokens(1 + pick(8));
                        s.tokens.insert(s.tokens.end(), tail.begin(), tail.end());
                    } else {
                        s.tokens = random_tokens(1 + pick(16));
                    }
                    if (pick(5) == 0) {
                        s.extra = {42};  // a LoRA adapter: other KV for the same tokens
                    }
                    const std::size_t expected = model.lookup(s.tokens, s.extra);
                    BOOST_TEST(pc.lookup(s.tokens, s.extra) == expected);
                    const auto [id, cached] = pc.attach(s.tokens, s.extra);
                    BOOST_TEST(cached == expected);
                    BOOST_TEST(c.tokens(id) == cached);
                    BOOST_TEST(kv_matches(c, id, s.tokens, cached));
                    live.emplace(id, live_seq{tokens_t(s.tokens.begin(), s.tokens.begin() + static_cast<std::ptrdiff_t>(cached)), s.extra});
                    if (append(id, s.tokens.size() - cached)) {
                        write_kv(c, id, s.tokens, cached);
                        live.at(id).tokens = s.tokens;
                        publish(id);
                    } else {
                        live.erase(id);
                        held_before = live_blocks();  // its own blocks may go once it is freed
                        pc.free(id);
                    }
                } else if (op < 60) {  // a decode step of some tokens
                    auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(pick(live.size())));
                    const tokens_t more = random_tokens(1 + pick(6));
                    if (append(it->first, more.size())) {
                        const std::size_t first = it->second.tokens.size();
                        it->second.tokens.insert(it->second.tokens.end(), more.begin(), more.end());
                        write_kv(c, it->first, it->second.tokens, first);
                        publish(it->first);
                    }
                } else if (op < 80) {  // a request ends
                    auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(pick(live.size())));
                    finished.push_back(it->second);
                    const vmmpp::seq_id id = it->first;
                    live.erase(it);
                    held_before = live_blocks();  // its own blocks may go once it is freed
                    if (pick(2) == 0) {
                        pc.free(id);
                    } else {
                        c.free(id);  // directly: the bound waits for the next call
                    }
                    if (options.max_cached_bytes != SIZE_MAX) {
                        pc.trim();
                    }
                } else if (op < 88) {
                    const std::size_t n = 1 + pick(8), before = pc.evictable_blocks();
                    const auto r = pc.evict(n);
                    BOOST_TEST(r.blocks.size() == std::min(n, before));
                    BOOST_TEST(r.keys.size() == r.blocks.size());
                } else if (op < 92) {
                    const std::size_t committed = c.pool().committed_bytes();
                    const auto r = pc.evict_bytes((1 + pick(2)) * page_bytes);
                    BOOST_TEST(r.freed_page_bytes % page_bytes == 0u);
                    BOOST_TEST(committed - c.pool().committed_bytes() == r.freed_page_bytes);
                } else if (op < 96) {  // moves cached blocks; check() then reads their bytes at the new ids
                    const std::size_t committed = c.pool().committed_bytes(), cached = pc.cached_blocks();
                    const auto r = pc.compact();
                    BOOST_TEST(committed - c.pool().committed_bytes() == r.freed_page_bytes);
                    BOOST_TEST((r.moved_blocks == 0u || r.freed_page_bytes > 0u));  // a move only to free pages
                    BOOST_TEST(pc.cached_blocks() == cached);
                    moved += r.moved_blocks;
                } else {
                    const tokens_t probe = pick(2) == 0 && !finished.empty() ? finished[pick(finished.size())].tokens
                                                                             : random_tokens(pick(20));
                    BOOST_TEST(pc.lookup(probe) == model.lookup(probe, {}));
                }
                check();
            }
            const auto s = pc.stats();
            BOOST_TEST(s.hits > 0u);  // the run did share prefixes
            BOOST_TEST(s.moves >= moved);  // free and trim compact too
            BOOST_TEST(s.cached_blocks == model.cached.size());
            for (const auto& [id, seq] : live) {
                c.free(id);
            }
            live.clear();
            held_before.clear();
            // Holes all over (half the cached blocks, oldest first), then packed by compaction.
            (void)pc.trim();  // the frees above were kv_cache's: the bound waited
            (void)pc.evict(pc.evictable_blocks() / 2);
            (void)pc.compact();
            check();
            moves_in_all_seeds += pc.stats().moves;
            pc.clear();
            check();
            BOOST_TEST(c.used_blocks() == 0u);
            BOOST_TEST(c.pool().committed_bytes() == 0u);
        }
    }
    BOOST_TEST(moves_in_all_seeds > 0u);  // blocks did move, and check() found their bytes at the new ids
}
