// vmmpp/prefix/page_groups.hpp: which pool pages a prefix cache's evictable blocks alone hold,
// for one eviction: the "page groups" (the evictable blocks that together alone hold some pages,
// oldest group first) that evict_bytes gives up whole when memory is asked for, and the bytes
// each of its evictions frees. A full view, O(evictable blocks x pieces) to build: evict, trim
// and append's evictions count their freed pages from the victims' pages alone
// (vmmpp/prefix/page_users.hpp; test_prefix_cache checks both agree).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vmmpp/kv/geometry.hpp"

namespace vmmpp::detail {

/// Calls f(page) for each pool page (of `page_bytes`) that block `b`'s pieces touch, a page once
/// per piece.
template <class Layout, class F>
void for_each_block_page(const kv_geometry& g, std::size_t page_bytes, std::int32_t b, F&& f) {
    std::size_t last = std::numeric_limits<std::size_t>::max();
    Layout::for_each_piece(g, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
        for (std::size_t p = off / page_bytes; p <= (off + bytes - 1) / page_bytes; ++p) {
            if (p != last) {
                f(p);
                last = p;
            }
        }
    });
}

/// The evictable blocks of a cache (given oldest first), the pages no other live block touches,
/// and the groups of blocks that alone hold the same pages.
template <class Cache>
class page_groups {
    using layout_type = typename Cache::layout_type;

public:
    struct group {
        std::vector<std::int32_t> members;  // sorted by id
        std::size_t age;                    // the newest member's place in the order
    };

    /// `order`: the evictable blocks (live, one reference: the prefix cache's), oldest first.
    /// `with_groups`: whether groups() is wanted (evict_bytes); without, only the pages each
    /// eviction frees are tracked (evict, trim), and groups() is empty.
    page_groups(const Cache& cache, std::size_t page_bytes, std::vector<std::int32_t> order, bool with_groups = true)
        : page_bytes_(page_bytes), order_(std::move(order)) {
        std::unordered_map<std::int32_t, std::size_t> rank;
        for (std::size_t i = 0; i < order_.size(); ++i) {
            rank.emplace(order_[i], i);
        }
        std::map<std::size_t, std::vector<std::int32_t>> members;  // page -> evictable blocks on it
        for (std::int32_t b : order_) {
            auto& pages = pages_of_[b];
            for_each_block_page<layout_type>(cache.geometry(), page_bytes_, b, [&](std::size_t page) {
                pages.push_back(page);
                members[page].push_back(b);
            });
        }
        // Pages some other live block touches stay, whatever is evicted.
        const std::size_t used = cache.used_blocks();
        std::size_t seen = 0;
        for (std::size_t id = 0; id < cache.geometry().max_blocks && seen < used; ++id) {
            const auto b = static_cast<std::int32_t>(id);
            if (cache.block_refs(b) == 0) {
                continue;
            }
            ++seen;
            if (!rank.contains(b)) {
                for_each_block_page<layout_type>(cache.geometry(), page_bytes_, b,
                                                 [&](std::size_t page) { members.erase(page); });
            }
        }
        if (!with_groups) {
            for (const auto& [page, blocks] : members) {
                left_[page] = blocks.size();
            }
            return;
        }
        std::map<std::vector<std::int32_t>, std::size_t> ages;  // pages with the same blocks: one group
        for (auto& [page, blocks] : members) {
            left_[page] = blocks.size();
            std::sort(blocks.begin(), blocks.end());
            std::size_t age = 0;
            for (std::int32_t b : blocks) {
                age = std::max(age, rank.at(b));
            }
            ages.emplace(blocks, age);
        }
        for (auto& [blocks, age] : ages) {
            groups_.push_back({blocks, age});
        }
        std::stable_sort(groups_.begin(), groups_.end(), [](const group& a, const group& b) { return a.age < b.age; });
    }

    /// The evictable blocks, oldest first.
    [[nodiscard]] const std::vector<std::int32_t>& order() const noexcept { return order_; }
    /// The groups, oldest first.
    [[nodiscard]] const std::vector<group>& groups() const noexcept { return groups_; }
    [[nodiscard]] bool gone(std::int32_t b) const { return gone_.contains(b); }
    /// Members of `g` not evicted yet.
    [[nodiscard]] std::size_t left_in(const group& g) const {
        return static_cast<std::size_t>(
            std::count_if(g.members.begin(), g.members.end(), [&](std::int32_t b) { return !gone_.contains(b); }));
    }
    /// Records that `b` was evicted; returns the bytes of the pages no block touches any more.
    std::size_t evicted(std::int32_t b) {
        gone_.emplace(b, true);
        std::size_t freed = 0;
        for (std::size_t page : pages_of_.at(b)) {
            if (auto it = left_.find(page); it != left_.end() && --it->second == 0) {
                freed += page_bytes_;
            }
        }
        return freed;
    }

private:
    std::size_t page_bytes_;
    std::vector<std::int32_t> order_;
    std::unordered_map<std::int32_t, std::vector<std::size_t>> pages_of_;  // of each evictable block
    std::map<std::size_t, std::size_t> left_;  // per candidate page: evictable blocks on it not yet evicted
    std::vector<group> groups_;
    std::unordered_map<std::int32_t, bool> gone_;
};

} // namespace vmmpp::detail
