// vmmpp/prefix/compaction.hpp: which cached blocks a prefix cache moves down into free ids so that
// pages above empty and go back. Eviction follows the policy's order alone (the hit rate of an
// exact LRU); the footprint is recovered here instead of by choosing victims by page. Only
// blocks no sequence holds move (the prefix cache's own reference, vmmpp/kv/relocate.hpp moves
// them); live blocks stay where they are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "vmmpp/prefix/page_groups.hpp"

namespace vmmpp::detail {

/// One move: the bytes of block `from` go to free id `to` (below it).
struct block_move {
    std::int32_t from;
    std::int32_t to;
};
struct compaction_plan {
    std::vector<block_move> moves;     ///< in order: each `to` is the lowest free id when its move runs
    std::size_t freed_page_bytes = 0;  ///< pages no block touches once they ran, net of pages they fill anew
};

/// Plans moves of the blocks `movable(b)` says may move among `cached` (block ids in ascending
/// order, every one live; walked from the highest down), each into the lowest free id while that
/// lies below it, at most `max_moves`; then keeps the shortest leading run of moves that frees
/// the most pages (pages a move empties, less the uncommitted pages its destination reaches),
/// none when no run frees a page: a move that frees nothing is a copy for nothing.
/// `users`: scratch of one counter per page of the span, all zero, left all zero.
/// Cost: the ids up to the lowest free one, and the cached ids above it (not max_blocks); where
/// some move is possible, a pass over the live blocks' pages too (O(live blocks x pieces per
/// block), ids up to the highest live one).
template <class Cache, class Ids, class Movable>
[[nodiscard]] compaction_plan plan_compaction(const Cache& cache, std::size_t page_bytes, std::size_t max_moves,
                                              const Ids& cached, std::vector<std::uint32_t>& users,
                                              Movable&& movable) {
    using layout_type = typename Cache::layout_type;
    const kv_geometry& g = cache.geometry();
    const auto n = static_cast<std::int32_t>(g.max_blocks);
    const auto next_free = [&](std::int32_t id) {
        while (id < n && cache.block_refs(id) != 0) {
            ++id;
        }
        return id;
    };
    compaction_plan plan;
    std::int32_t lo = next_free(0);
    auto hi = cached.rbegin();
    while (plan.moves.size() < max_moves) {
        while (hi != cached.rend() && *hi > lo && !movable(*hi)) {
            ++hi;
        }
        if (hi == cached.rend() || *hi <= lo) {
            break;
        }
        plan.moves.push_back({*hi, lo});
        ++hi;
        lo = next_free(lo + 1);
    }
    if (plan.moves.empty()) {
        return plan;
    }
    // How many live blocks touch each page, then the moves played on those counts; the pages
    // counted are remembered so the scratch goes back to zero.
    const std::size_t pages = (layout_type::span_bytes(g) + page_bytes - 1) / page_bytes;
    if (users.size() != pages) {
        users.assign(pages, 0);
    }
    // The pages counted, zeroed again on the way out (a throw included): every page with a
    // nonzero count is in `touched`, since a page is recorded before its count first rises.
    struct zero_touched {
        std::vector<std::uint32_t>& users;
        std::vector<std::size_t> touched;
        ~zero_touched() {
            for (std::size_t p : touched) {
                users[p] = 0;
            }
        }
    } scratch{users, {}};
    const auto count = [&](std::size_t p) {
        if (users[p] == 0) {
            scratch.touched.push_back(p);  // may throw: the count not raised yet
        }
        ++users[p];
    };
    std::size_t seen = 0;
    for (std::int32_t id = 0; id < n && seen < cache.used_blocks(); ++id) {
        if (cache.block_refs(id) != 0) {
            ++seen;
            for_each_block_page<layout_type>(g, page_bytes, id, count);
        }
    }
    std::ptrdiff_t freed = 0, best = 0;
    std::size_t best_moves = 0;
    for (std::size_t i = 0; i < plan.moves.size(); ++i) {
        const block_move& m = plan.moves[i];
        for_each_block_page<layout_type>(g, page_bytes, m.from, [&](std::size_t p) { freed += --users[p] == 0 ? 1 : 0; });
        for_each_block_page<layout_type>(g, page_bytes, m.to, [&](std::size_t p) {
            freed -= users[p] == 0 ? 1 : 0;
            count(p);
        });
        if (freed > best) {
            best = freed;
            best_moves = i + 1;
        }
    }
    plan.moves.resize(best_moves);
    plan.freed_page_bytes = static_cast<std::size_t>(best) * page_bytes;
    return plan;
}

} // namespace vmmpp::detail
