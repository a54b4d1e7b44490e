// vmmpp/prefix/lending.hpp on the host backing with a shared budget: a model whose growth the
// global limit refuses takes another, idle model's evictable cached blocks (whole pages, about
// what it needs) before over_quota; live blocks are never taken; the lender's prefix cache stays
// consistent; and a lender whose owner thread keeps working while others reclaim (run under TSan).
#define BOOST_TEST_MODULE prefix lending
#include "support/cpu_main.hpp"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "support/pool_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/prefix/lending.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"

using namespace vmmpp_test;

namespace {

// block_major, one block = 2 layers x K/V x 16 tokens x 64 heads x 64 dims x 2 bytes = 512 KiB:
// four blocks a 2 MiB page.
constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 64, .head_dim = 64, .type = vmmpp::dtype::f16,
                               .block_tokens = 16, .max_blocks = 64};
constexpr std::size_t block_bytes = std::size_t{512} << 10;
constexpr std::size_t tokens_per_page = 4 * 16;

/// Pages committed one by one, so one emptied page is one page back to the budget.
using cache_t = vmmpp::kv_cache<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>>;
using prefix_t = vmmpp::prefix_cache<cache_t>;
using lending_t = vmmpp::prefix_lending<prefix_t>;

/// A model on `budget`.
cache_t make_cache(vmmpp::budget& budget, const char* name, std::size_t limit) {
    return cache_t(g, {}, {}, budget.register_model(name, limit));
}

std::vector<std::int32_t> prompt(std::int32_t first, std::size_t n) {
    std::vector<std::int32_t> t(n);
    for (std::size_t i = 0; i < n; ++i) {
        t[i] = first + static_cast<std::int32_t>(i);
    }
    return t;
}

/// Stamps each block of `seq` with (tag, its index in the sequence) in layer 0's K.
void stamp(cache_t& c, vmmpp::seq_id seq, std::uint32_t tag) {
    const auto table = c.block_table(seq);
    for (std::size_t i = 0; i < table.size(); ++i) {
        const std::uint64_t v = (std::uint64_t{tag} << 32) | i;
        std::memcpy(c.key(0, table[i]), &v, sizeof v);
    }
}
std::uint64_t stamp_of(const cache_t& c, std::int32_t block) {
    std::uint64_t v = 0;
    std::memcpy(&v, c.key(0, block), sizeof v);
    return v;
}

/// Model A's prompt of `n_tokens`, written, stamped with `tag`, published and freed: cached only.
void cache_prompt(cache_t& c, prefix_t& p, const std::vector<std::int32_t>& tokens, std::uint32_t tag) {
    const auto seq = c.add_sequence();
    p.append(seq, tokens.size());
    stamp(c, seq, tag);
    p.publish(seq, tokens);
    p.free(seq);
}

} // namespace

// Model A caches 4 pages of a prompt and holds 2 pages live, then goes idle; model B grows past
// what the global limit leaves. B's appends take A's cached pages, about as many as each needs
// (the prompt's tail first: a cached prefix stays a prefix), then B is refused with A's live
// blocks and the rest of its cache as they were.
BOOST_AUTO_TEST_CASE(a_refused_model_takes_an_idle_models_cached_pages_never_its_live_ones) {
    vmmpp::budget budget(8 * page);  // 8 pages for both
    cache_t a = make_cache(budget, "a", 16 * page);
    cache_t b = make_cache(budget, "b", 16 * page);
    prefix_t pa(a);
    lending_t lend(pa);

    const auto cached = prompt(1000, 4 * tokens_per_page);  // 16 blocks, 4 pages
    cache_prompt(a, pa, cached, 7);
    const auto live = a.add_sequence();
    a.append(live, 2 * tokens_per_page);  // 8 blocks, 2 pages, held
    stamp(a, live, 9);
    const std::vector<std::int32_t> live_blocks(a.block_table(live).begin(), a.block_table(live).end());
    BOOST_TEST(budget.stats().committed == 6 * page);
    BOOST_TEST(pa.stats().evictable_blocks == 16u);

    // B: 2 pages fit; 1 more page needs one of A's cached pages, and takes one page only.
    const auto sb = b.add_sequence();
    b.append(sb, 2 * tokens_per_page);
    b.append(sb, tokens_per_page);
    BOOST_TEST(pa.stats().evictions == 4u);
    BOOST_TEST(pa.lookup(cached) == 3 * tokens_per_page);  // the tail went first
    BOOST_TEST(lend.stats().lends == 1u);
    BOOST_TEST(lend.stats().lent_blocks == 4u);
    BOOST_TEST(lend.stats().lent_bytes == page);
    const auto sa = budget.stats().models.at(0);
    BOOST_TEST(sa.cache_reclaims == 1u);
    BOOST_TEST(sa.cache_reclaimed == page);

    // The blocks still cached hold what A wrote: an attach gets them back intact.
    const auto again = pa.attach(cached);
    BOOST_TEST(again.cached_tokens == 3 * tokens_per_page);
    const auto table = a.block_table(again.seq);
    for (std::size_t i = 0; i < table.size(); ++i) {
        BOOST_TEST(stamp_of(a, table[i]) == ((std::uint64_t{7} << 32) | i));
    }
    pa.free(again.seq);

    // B takes the rest of A's cache, 3 pages in one append.
    b.append(sb, 3 * tokens_per_page);
    BOOST_TEST(pa.cached_blocks() == 0u);
    BOOST_TEST(pa.lookup(cached) == 0u);
    BOOST_TEST(budget.stats().committed == 8 * page);

    // Only A's live blocks are left: B is refused, A is unchanged.
    BOOST_CHECK_THROW(b.append(sb, 16), vmmpp::over_quota);
    BOOST_TEST(a.tokens(live) == 2 * tokens_per_page);
    BOOST_TEST(std::vector<std::int32_t>(a.block_table(live).begin(), a.block_table(live).end()) == live_blocks);
    for (std::size_t i = 0; i < live_blocks.size(); ++i) {
        BOOST_TEST(stamp_of(a, live_blocks[i]) == ((std::uint64_t{9} << 32) | i));
    }
    BOOST_TEST(a.pool().committed_bytes() == 2 * page);
    BOOST_TEST(lend.stats().lent_blocks == 16u);
}

// Lending stops with the lending object: without it (as before the feature) B is refused while
// A's cache keeps every block.
BOOST_AUTO_TEST_CASE(without_lending_the_refused_model_gets_over_quota) {
    vmmpp::budget budget(8 * page);
    cache_t a = make_cache(budget, "a", 8 * page);
    cache_t b = make_cache(budget, "b", 8 * page);
    prefix_t pa(a);
    {
        lending_t lend(pa);
    }
    const auto cached = prompt(1, 4 * tokens_per_page);
    cache_prompt(a, pa, cached, 1);
    const auto sb = b.add_sequence();
    b.append(sb, 4 * tokens_per_page);
    BOOST_CHECK_THROW(b.append(sb, 16), vmmpp::over_quota);
    BOOST_TEST(pa.cached_blocks() == 16u);
}

// A model's own limit refusing is not helped by other models' memory: nothing is evicted.
BOOST_AUTO_TEST_CASE(a_model_limit_refusal_takes_nothing) {
    vmmpp::budget budget(16 * page);
    cache_t a = make_cache(budget, "a", 16 * page);
    cache_t b = make_cache(budget, "b", 2 * page);
    prefix_t pa(a);
    lending_t lend(pa);
    cache_prompt(a, pa, prompt(1, 4 * tokens_per_page), 1);
    const auto sb = b.add_sequence();
    b.append(sb, 2 * tokens_per_page);
    BOOST_CHECK_THROW(b.append(sb, 16), vmmpp::over_quota);
    BOOST_TEST(pa.cached_blocks() == 16u);
    BOOST_TEST(lend.stats().lends == 0u);
}

// With adaptive_extents (elastic_config's growth) a prompt's pages are one extent, and an extent
// goes back only whole: to give B one page, A's lender is asked again until the whole extent is
// empty (4 pages evicted for 1 needed). B still gets its page, and what A evicted beyond the need
// is back in the budget. A measured limit of page-level lending over extents.
BOOST_AUTO_TEST_CASE(over_extents_a_lender_empties_whole_extents) {
    using ext_cache_t = vmmpp::kv_cache<host_adaptive_config>;
    using ext_prefix_t = vmmpp::prefix_cache<ext_cache_t>;
    vmmpp::budget budget(8 * page);
    ext_cache_t a(g, {}, vmmpp::adaptive_extents{.spare_pages = 0}, budget.register_model("a", 8 * page));
    ext_cache_t b(g, {}, vmmpp::adaptive_extents{.spare_pages = 0}, budget.register_model("b", 8 * page));
    ext_prefix_t pa(a);
    vmmpp::prefix_lending<ext_prefix_t> lend(pa);
    const auto tokens = prompt(1, 4 * tokens_per_page);
    {
        const auto s = a.add_sequence();
        pa.append(s, tokens.size());  // one extent of 4 pages
        pa.publish(s, tokens);
        pa.free(s);
    }
    BOOST_TEST(a.pool().stats().commits == 1u);
    const auto sb = b.add_sequence();
    b.append(sb, 4 * tokens_per_page);
    BOOST_CHECK_NO_THROW(b.append(sb, tokens_per_page));
    BOOST_TEST(lend.stats().lent_blocks == 16u);  // the whole extent, not the one page needed
    BOOST_TEST(lend.stats().lends == 4u);         // asked once per page until the extent emptied
    BOOST_TEST(budget.stats().committed == 5 * page);
}

// A's owner thread keeps attaching, appending, publishing and freeing through the lending
// wrappers while B's thread grows and shrinks past the global limit, taking A's cached pages.
// Both stay consistent; under TSan, race free.
BOOST_AUTO_TEST_CASE(the_owner_works_while_another_model_reclaims) {
    vmmpp::budget budget(12 * page);
    cache_t a = make_cache(budget, "a", 12 * page);
    cache_t b = make_cache(budget, "b", 12 * page);
    prefix_t pa(a);
    lending_t lend(pa);
    // A's 6 prompts fill the budget first: B's first growth must take from A's cache.
    for (std::uint32_t k = 0; k < 6; ++k) {
        cache_prompt(a, pa, prompt(static_cast<std::int32_t>(k) * 10000, 2 * tokens_per_page), k);
    }
    BOOST_TEST(budget.stats().committed == 12 * page);
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> b_grew{0}, b_refused{0}, a_refused{0}, a_bad{0};

    std::thread owner([&] {
        for (std::uint32_t round = 0; !stop.load(); ++round) {
            const auto tokens = prompt(static_cast<std::int32_t>(round % 6) * 10000, 2 * tokens_per_page);
            try {
                const auto s = lend.attach(tokens);
                lend.with([&](prefix_t& p) {
                    // Blocks found are the ones written under this prompt: their stamps agree.
                    const auto table = p.cache().block_table(s.seq);
                    for (std::size_t i = 0; i < s.cached_tokens / 16; ++i) {
                        a_bad += stamp_of(p.cache(), table[i]) != ((std::uint64_t{round % 6} << 32) | i) ? 1 : 0;
                    }
                });
                try {
                    lend.append(s.seq, tokens.size() - s.cached_tokens);
                    lend.with([&](prefix_t& p) {
                        const auto table = p.cache().block_table(s.seq);
                        for (std::size_t i = s.cached_tokens / 16; i < table.size(); ++i) {
                            const std::uint64_t v = (std::uint64_t{round % 6} << 32) | i;
                            std::memcpy(p.cache().key(0, table[i]), &v, sizeof v);
                        }
                    });
                    lend.publish(s.seq, tokens);
                } catch (const vmmpp::over_quota&) {
                    ++a_refused;
                }
                lend.free(s.seq);
            } catch (const vmmpp::out_of_blocks&) {
                ++a_refused;
            }
        }
    });
    std::thread other([&] {
        std::vector<vmmpp::seq_id> held;
        for (int step = 0; step < 400; ++step) {
            try {
                const auto s = b.add_sequence();
                held.push_back(s);
                b.append(s, tokens_per_page);
                ++b_grew;
            } catch (const vmmpp::over_quota&) {
                ++b_refused;
            }
            if (held.size() >= 8 || step % 7 == 6) {
                for (auto s : held) {
                    b.free(s);
                }
                held.clear();
            }
        }
        for (auto s : held) {
            b.free(s);
        }
        stop = true;
    });
    other.join();
    owner.join();

    BOOST_TEST(a_bad.load() == 0u);
    BOOST_TEST(b_grew.load() > 0u);
    BOOST_TEST(lend.stats().lends > 0u);
    BOOST_TEST_MESSAGE("B grew " << b_grew << ", refused " << b_refused << "; A refused " << a_refused << "; lends "
                                 << lend.stats().lends << " (" << lend.stats().lent_blocks << " blocks), busy "
                                 << lend.stats().busy);
    // Quiet now: the budget matches the pools, and A's cache holds whole, consistent entries.
    BOOST_TEST(budget.stats().committed == a.pool().committed_bytes() + b.pool().committed_bytes());
    std::size_t cached = 0;
    pa.for_each_cached([&](const vmmpp::block_key& key, std::int32_t block) {
        ++cached;
        BOOST_TEST(pa.key_of(block).has_value());
        BOOST_TEST((pa.block_of(key) == std::optional<std::int32_t>(block)));
    });
    BOOST_TEST(cached == pa.cached_blocks());
}
