// KV groups (vmmpp/groups/) on host memory, every paged layout (CI runs these for real): a sliding
// window gives back the blocks its sequences left while they live (kv_cache::release_leading_blocks,
// its null block in their place), state slots follow the live sequences, and kv_groups drives a
// Gemma-3-like model (sliding + full attention) with a state-space group on one budget: strong
// under refusals, and a randomized run against a model of every token's value and every state.
// The stream order of the same paths is tested on the fake driver (test_kv_groups_fakecuda).
#define BOOST_TEST_MODULE kv groups
#include "support/cpu_main.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <tuple>
#include <vector>

#include "support/kv_factories.hpp"
#include "support/kv_tokens.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/groups/kv_groups.hpp"

using namespace vmmpp_test;

namespace {

using window_cases = vmmpp::apply_t<kv_cases_over<vmmpp::host_config, vmmpp::paged_kv_layouts>, std::tuple>;

// 4 tokens a block, 2 layers, 2 heads of 64, fp16: a K or V piece of 1 KiB; 4 KiB host pages, so
// the memory under released blocks can go back in every layout.
constexpr vmmpp::kv_geometry small{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 4, .max_blocks = 256};
constexpr vmmpp::host_options small_pages{.page_bytes = 4096};

template <class Case>
std::unique_ptr<typename Case::cache> make_cache(const vmmpp::kv_geometry& g = small) {
    return std::make_unique<typename Case::cache>(fit_geometry<typename Case::layout>(g), small_pages);
}

/// Writes value(position) into every token of `seq` from `first` on.
template <class Cache, class Value>
void write_tokens(Cache& c, vmmpp::seq_id seq, std::size_t first, Value value) {
    std::vector<std::int64_t> slots(c.tokens(seq) - first);
    c.slot_mapping(seq, first, slots);
    for (std::size_t i = 0; i < slots.size(); ++i) {
        write_token(c, slots[i], value(first + i));
    }
}

/// Positions in [first, tokens) of `seq` whose K or V differs from value(position).
template <class Cache, class Value>
std::size_t wrong_tokens(const Cache& c, vmmpp::seq_id seq, std::size_t first, Value value) {
    std::vector<std::int64_t> slots(c.tokens(seq) - first);
    c.slot_mapping(seq, first, slots);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < slots.size(); ++i) {
        const auto [k, v] = read_token(c, slots[i]);
        wrong += k != value(first + i) || v != value(first + i) ? 1 : 0;
    }
    return wrong;
}

std::uint16_t position_value(std::size_t pos) { return static_cast<std::uint16_t>(1000 + pos); }

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(a_window_gives_back_the_blocks_its_sequence_left, Case, window_cases) {
    auto c = make_cache<Case>();
    vmmpp::sliding_window window(*c, 10);
    const std::int32_t null = window.null_block();
    BOOST_TEST(c->block_refs(null) == 1u);
    BOOST_TEST(c->used_blocks() == 1u);

    const auto a = c->add_sequence();
    c->append(a, 62);  // 16 blocks (ids 1-16), the last half full
    write_tokens(*c, a, 0, position_value);
    const std::size_t committed_before = c->pool().committed_bytes();

    // The next query is at 62 and reads (52, 62]: blocks 0-12 (tokens 0-51) are outside.
    BOOST_TEST(window.blocks_unread(a, 62) == 13u);
    BOOST_TEST(window.slide(a) == 13u);
    const auto table = c->block_table(a);
    BOOST_TEST(table.size() == 16u);
    for (std::size_t i = 0; i < 13; ++i) {
        BOOST_TEST(table[i] == null);
    }
    BOOST_TEST(c->used_blocks() == 1u + 3u);
    BOOST_TEST(c->block_refs(null) == 1u + 13u);
    // Whole pages emptied in every layout (layer_major: 4 blocks' pieces a page, ids 4-11).
    BOOST_TEST(c->pool().committed_bytes() < committed_before);
    BOOST_TEST(wrong_tokens(*c, a, 52, position_value) == 0u);  // the window is untouched
    BOOST_TEST(window.slide(a) == 0u);                           // nothing more left it

    // A fork shares the window and the null block's positions; its append copies the partial block.
    const auto b = c->fork(a);
    BOOST_TEST(c->block_refs(null) == 1u + 26u);
    c->append(b, 1);
    write_tokens(*c, b, 62, position_value);
    BOOST_TEST(c->cow_copies() == 1u);
    BOOST_TEST(wrong_tokens(*c, b, 52, position_value) == 0u);
    BOOST_TEST(wrong_tokens(*c, a, 52, position_value) == 0u);

    // Ending both leaves the null block alone, held by the window.
    c->free(a);
    c->free(b);
    BOOST_TEST(c->used_blocks() == 1u);
    BOOST_TEST(c->block_refs(null) == 1u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(releasing_leading_blocks_refuses_and_changes_nothing, Case, window_cases) {
    auto c = make_cache<Case>();
    vmmpp::sliding_window window(*c, 4);
    const auto a = c->add_sequence();
    c->append(a, 10);  // 3 blocks, the last half full
    const std::vector<std::int32_t> table(c->block_table(a).begin(), c->block_table(a).end());
    const std::size_t used = c->used_blocks();

    BOOST_CHECK_THROW(c->release_leading_blocks(a + 7, 1, window.null_block(), nullptr), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(c->release_leading_blocks(a, 4, window.null_block(), nullptr), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(c->release_leading_blocks(a, 3, window.null_block(), nullptr),
                      vmmpp::invalid_argument);  // the partly filled last block
    BOOST_CHECK_THROW(c->release_leading_blocks(a, 1, 200, nullptr), vmmpp::invalid_argument);  // a free placeholder
    BOOST_CHECK_THROW((void)window.blocks_unread(a, 11), vmmpp::invalid_argument);
    BOOST_TEST(std::vector<std::int32_t>(c->block_table(a).begin(), c->block_table(a).end()) == table);
    BOOST_TEST(c->used_blocks() == used);
    BOOST_CHECK_THROW(vmmpp::sliding_window(*c, 0), vmmpp::invalid_argument);

    // Released once, a position is not released again.
    BOOST_TEST(c->release_leading_blocks(a, 2, window.null_block(), nullptr) == 2u);
    BOOST_TEST(c->release_leading_blocks(a, 2, window.null_block(), nullptr) == 0u);
    BOOST_TEST(c->used_blocks() == used - 2);
}

BOOST_AUTO_TEST_CASE(the_sequence_contiguous_layout_has_no_window) {
    using cache_t = vmmpp::kv_cache<vmmpp::host_config, vmmpp::sequence_contiguous>;
    vmmpp::kv_geometry g = small;
    g.max_tokens_per_sequence = 64;
    cache_t c(g, small_pages);
    BOOST_CHECK_THROW(vmmpp::sliding_window(c, 16), vmmpp::invalid_argument);  // take_block: cannot share
}

BOOST_AUTO_TEST_CASE(state_slots_follow_the_live_sequences) {
    // 3000-byte states (a stride of 3072): 4 KiB pages hold one slot and a part of the next.
    vmmpp::state_slots<vmmpp::host_config> slots(3000, 64, small_pages);
    BOOST_TEST(slots.slot_stride() == 3072u);
    BOOST_TEST(slots.pool().committed_bytes() == 0u);
    const auto a = slots.acquire();
    const auto b = slots.acquire();
    BOOST_TEST(a == 0u);
    BOOST_TEST(b == 1u);
    BOOST_TEST(slots.data(b) - slots.data(a) == 3072);
    BOOST_TEST(slots.pool().committed_bytes() == 8192u);  // slots 0-1: bytes [0, 6072)
    std::memset(slots.data(a), 0x5a, 3000);

    // A fork copies the state; the copy is the lowest free slot.
    const auto c = slots.fork(a, nullptr);
    BOOST_TEST(c == 2u);
    BOOST_TEST(std::memcmp(slots.data(c), slots.data(a), 3000) == 0);
    BOOST_TEST(slots.used_slots() == 3u);

    // Released slots give their pages back and come back lowest first.
    slots.release(b);
    slots.release(c);
    BOOST_TEST(slots.pool().committed_bytes() == 4096u);
    BOOST_TEST(slots.acquire() == 1u);
    BOOST_CHECK_THROW(slots.release(7), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(slots.release(c), vmmpp::invalid_argument);  // released already
    BOOST_CHECK_THROW((void)slots.fork(c, nullptr), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)slots.data(64), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(vmmpp::state_slots<vmmpp::host_config>(0, 4), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(vmmpp::state_slots<vmmpp::host_config>(64, 0), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(state_slots_refuse_and_change_nothing) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget budget(std::size_t{2} << 20);
    vmmpp::state_slots<config> full(4096, 2, small_pages, {}, budget.register_model("full", std::size_t{2} << 20));
    (void)full.acquire();
    (void)full.acquire();
    BOOST_CHECK_THROW((void)full.acquire(), vmmpp::out_of_blocks);
    BOOST_TEST(full.used_slots() == 2u);

    // A budget of two pages: the third slot is over quota, and nothing changed.
    vmmpp::state_slots<config> tight(4096, 16, small_pages, {}, budget.register_model("tight", 8192));
    const auto a = tight.acquire();
    (void)tight.acquire();
    BOOST_CHECK_THROW((void)tight.acquire(), vmmpp::over_quota);
    BOOST_CHECK_THROW((void)tight.fork(a, nullptr), vmmpp::over_quota);
    BOOST_TEST(tight.used_slots() == 2u);
    BOOST_TEST(tight.pool().committed_bytes() == 8192u);
    tight.release(a);
    BOOST_TEST(tight.acquire() == a);
}

namespace {

// A Gemma-3-like model in small: sliding layers and full layers, plus a state-space group (a
// hybrid's), the three pools on one share of a budget (copies of one register_model).
using gemma_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
using gemma_cache = vmmpp::kv_cache<gemma_config, vmmpp::block_major>;  // a block: one 4 KiB page
using gemma_slots = vmmpp::state_slots<gemma_config>;
using gemma_groups = vmmpp::kv_groups<vmmpp::window_group<gemma_cache>, vmmpp::attention_group<gemma_cache>,
                                      vmmpp::state_group<gemma_slots>>;
struct gemma_rig {
    gemma_rig(std::size_t limit, std::size_t window_tokens, std::size_t state_bytes = 512)
        : budget(std::size_t{1} << 30),
          share(budget.register_model("gemma", limit)),
          local(small, small_pages, {}, share),
          global(small, small_pages, {}, share),
          states(state_bytes, 64, small_pages, {}, share),
          window(local, window_tokens),
          full(global),
          ssm(states),
          model(window, full, ssm) {}

    [[nodiscard]] std::size_t charged() const { return budget.stats().models.at(0).committed; }

    vmmpp::budget budget;
    vmmpp::shared_budget share;
    gemma_cache local, global;
    gemma_slots states;
    vmmpp::window_group<gemma_cache> window;
    vmmpp::attention_group<gemma_cache> full;
    vmmpp::state_group<gemma_slots> ssm;
    gemma_groups model;
};

/// A token's value: its position and the sequence's history (two forks of one sequence differ
/// after they part).
std::uint16_t token_value(std::uint32_t history, std::size_t pos) {
    return static_cast<std::uint16_t>(history * 131 + pos * 7 + 1);
}
/// The state after a token: a recurrence over the tokens, as a state-space layer's.
std::uint32_t next_state(std::uint32_t state, std::uint16_t token) { return state * 2654435761u + token; }

std::vector<std::int32_t> table_of(const gemma_cache& c, vmmpp::seq_id s) {
    return {c.block_table(s).begin(), c.block_table(s).end()};
}

}  // namespace

BOOST_AUTO_TEST_CASE(groups_refuse_together_and_change_nothing) {
    // 7 pages for the model: the window's null block, a state of a page, then blocks of a page.
    gemma_rig r(7 * 4096, 4, 4096);
    const auto s = r.model.add_sequence(nullptr);
    BOOST_TEST(r.model.handle<2>(s) == 0u);  // its state slot
    r.model.append(s, 8, nullptr);           // 2 blocks in each cache: 6 pages
    const auto local_table = table_of(r.local, r.model.handle<0>(s));
    const auto global_table = table_of(r.global, r.model.handle<1>(s));

    // 4 more tokens: the sliding group takes its block (7 pages), the full group is refused, and
    // the sliding group gives its block back: nothing changed.
    BOOST_CHECK_THROW(r.model.append(s, 4, nullptr), vmmpp::over_quota);
    BOOST_TEST(r.model.tokens(s) == 8u);
    BOOST_TEST(r.local.tokens(r.model.handle<0>(s)) == 8u);
    BOOST_TEST(table_of(r.local, r.model.handle<0>(s)) == local_table);
    BOOST_TEST(table_of(r.global, r.model.handle<1>(s)) == global_table);
    BOOST_TEST(r.local.used_blocks() == 1u + 2u);
    BOOST_TEST(r.global.used_blocks() == 2u);

    // A fork needs a state slot (a page); with no page left in the budget, nothing changed either.
    r.budget.set_model_limit("gemma", 6 * 4096);
    BOOST_CHECK_THROW((void)r.model.fork(s, nullptr), vmmpp::over_quota);
    BOOST_TEST(r.model.sequence_count() == 1u);
    BOOST_TEST(r.local.sequence_count() == 1u);
    BOOST_TEST(r.global.sequence_count() == 1u);
    BOOST_TEST(r.states.used_slots() == 1u);

    // With room, the window slides as the sequence grows: at 12 tokens the next step's first
    // query (8) reads (4, 8], so block 0 went.
    r.budget.set_model_limit("gemma", 64 * 4096);
    r.model.append(s, 4, nullptr);
    BOOST_TEST(r.local.block_table(r.model.handle<0>(s))[0] == r.window.window().null_block());
    BOOST_TEST(r.local.used_blocks() == 1u + 2u);
    BOOST_TEST(r.global.used_blocks() == 3u);
    r.model.free(s, nullptr);
    BOOST_TEST(r.local.used_blocks() == 1u);
    BOOST_TEST(r.global.used_blocks() == 0u);
    BOOST_TEST(r.states.used_slots() == 0u);
    BOOST_CHECK_THROW(r.model.free(s, nullptr), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(r.model.append(s, 1, nullptr), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(randomized_groups_against_a_model_of_every_token_and_state) {
    constexpr std::size_t window = 10;
    for (unsigned seed = 1; seed <= 6; ++seed) {
        BOOST_TEST_CONTEXT("seed " << seed) {
            gemma_rig r(std::size_t{1} << 30, window);
            std::mt19937 rng(seed);
            struct model_sequence {
                std::uint32_t history;
                std::vector<std::uint16_t> values;  // every token's value
                std::uint32_t state = 0;
                std::size_t released = 0;  // leading blocks the window let go of
            };
            std::map<vmmpp::seq_id, model_sequence> live;
            std::uint32_t histories = 0;
            auto state_of = [&](vmmpp::seq_id s) {
                std::uint32_t v = 0;
                std::memcpy(&v, r.states.data(r.model.handle<2>(s)), sizeof v);
                return v;
            };
            auto pick = [&] {
                auto it = live.begin();
                std::advance(it, std::uniform_int_distribution<std::size_t>(0, live.size() - 1)(rng));
                return it;
            };
            for (int step = 0; step < 400; ++step) {
                const int op = std::uniform_int_distribution<int>(0, 9)(rng);
                if (live.empty() || (op == 0 && live.size() < 12)) {
                    const auto s = r.model.add_sequence(nullptr);
                    std::memset(r.states.data(r.model.handle<2>(s)), 0, sizeof(std::uint32_t));
                    live[s] = {++histories, {}, 0, 0};
                } else if (op <= 6) {  // append a step (or a prompt) and write it
                    auto it = pick();
                    const std::size_t n = op <= 5 ? 1 : std::uniform_int_distribution<std::size_t>(2, 20)(rng);
                    if (it->second.values.size() + n > 200) {
                        continue;
                    }
                    const std::size_t first = it->second.values.size();
                    r.model.append(it->first, n, nullptr);
                    for (std::size_t p = first; p < first + n; ++p) {
                        it->second.values.push_back(token_value(it->second.history, p));
                        it->second.state = next_state(it->second.state, it->second.values.back());
                    }
                    const auto value = [&](std::size_t p) { return it->second.values[p]; };
                    write_tokens(r.local, r.model.handle<0>(it->first), first, value);
                    write_tokens(r.global, r.model.handle<1>(it->first), first, value);
                    std::memcpy(r.states.data(r.model.handle<2>(it->first)), &it->second.state, sizeof(std::uint32_t));
                    if (first + 1 > window) {  // what the step writing the tokens does not read
                        it->second.released = std::max(it->second.released, (first + 1 - window) / small.block_tokens);
                    }
                } else if (op == 7 && live.size() < 12) {  // fork: the child's own history from here
                    auto it = pick();
                    const auto child = r.model.fork(it->first, nullptr);
                    live[child] = {++histories, it->second.values, it->second.state, it->second.released};
                } else if (op >= 8) {
                    auto it = pick();
                    r.model.free(it->first, nullptr);
                    live.erase(it);
                }
                // Every live sequence: the full group holds every token, the sliding group every
                // token of the window and the null block for the blocks it released, the state
                // group the state.
                std::size_t window_blocks = 0;
                for (const auto& [s, m] : live) {
                    const auto value = [&](std::size_t p) { return m.values[p]; };
                    const std::size_t tokens = m.values.size();
                    BOOST_TEST(r.model.tokens(s) == tokens);
                    BOOST_TEST(wrong_tokens(r.global, r.model.handle<1>(s), 0, value) == 0u);
                    BOOST_TEST(wrong_tokens(r.local, r.model.handle<0>(s), tokens > window ? tokens - window : 0,
                                            value) == 0u);
                    BOOST_TEST(state_of(s) == m.state);
                    const auto table = r.local.block_table(r.model.handle<0>(s));
                    const std::int32_t null = r.window.window().null_block();
                    for (std::size_t b = 0; b < table.size(); ++b) {
                        BOOST_TEST((table[b] == null) == (b < m.released));
                    }
                    window_blocks += table.size() - m.released;
                }
                // Live blocks of the sliding group: those of the windows (shared or not) and the null block.
                BOOST_TEST(r.local.used_blocks() <= 1 + window_blocks);
                BOOST_TEST(r.states.used_slots() == live.size());
            }
            for (const auto& [s, m] : live) {
                r.model.free(s, nullptr);
            }
            BOOST_TEST(r.local.used_blocks() == 1u);
            BOOST_TEST(r.global.used_blocks() == 0u);
            BOOST_TEST(r.states.used_slots() == 0u);
        }
    }
}
