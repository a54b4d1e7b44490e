// vmmpp/prefix/page_users.hpp: which block ids touch a pool page, from the layout's geometry
// alone, and from it the pages one eviction frees: for each page of the evicted block, whether
// any live block still touches it. Its cost is the evicted block's pages and the ids that share
// them (stopping at the first live one), not the cache's evictable blocks (page_groups.hpp
// builds that full view, for evict_bytes).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/prefix/page_groups.hpp"

namespace vmmpp::detail {

/// The pieces of a paged layout's blocks as arithmetic: piece k of block b is
/// [base_k + b x stride_k, + bytes_k) (every paged layout is so; test_prefix_cache checks it
/// against Layout::for_each_piece). Answers which ids touch a page without a scan of the ids.
template <class Layout>
class block_page_map {
public:
    block_page_map(const kv_geometry& g, std::size_t page_bytes) : page_bytes_(page_bytes), max_blocks_(g.max_blocks) {
        Layout::for_each_piece(g, 0, [&](std::size_t off, std::size_t bytes) { pieces_.push_back({off, bytes, bytes, 0}); });
        if (g.max_blocks > 1) {
            std::size_t k = 0;
            Layout::for_each_piece(g, 1, [&](std::size_t off, std::size_t) {
                pieces_[k].stride = off - pieces_[k].base;
                ++k;
            });
        }
        for (piece& p : pieces_) {
            p.stride = std::max<std::size_t>(p.stride, 1);  // one block: any stride gives id 0 only
            p.end = p.base + (max_blocks_ - 1) * p.stride + p.bytes;
        }
        std::sort(pieces_.begin(), pieces_.end(), [](const piece& a, const piece& b) { return a.base < b.base; });
        for (std::size_t k = 1; k < pieces_.size(); ++k) {
            disjoint_ = disjoint_ && pieces_[k - 1].end <= pieces_[k].base;
        }
    }

    /// Calls f(block) for each block id whose pieces touch page `page` (a block once per piece
    /// on it), while f returns true; returns false when f stopped it.
    template <class F>
    bool for_each_block_on_page(std::size_t page, F&& f) const {
        const std::size_t a = page * page_bytes_, e = a + page_bytes_;
        // Regions (a piece's bytes over all ids) in ascending order and disjoint: only those that
        // reach past the page's start, up to the page's end.
        auto k = disjoint_ ? std::partition_point(pieces_.begin(), pieces_.end(), [&](const piece& p) { return p.end <= a; })
                           : pieces_.begin();
        for (; k != pieces_.end() && (!disjoint_ || k->base < e); ++k) {
            if (k->base >= e || k->end <= a) {
                continue;
            }
            // base + i x stride < e and base + i x stride + bytes > a
            const std::size_t hi = std::min<std::size_t>((e - 1 - k->base) / k->stride, max_blocks_ - 1);
            const std::size_t lo = a < k->base + k->bytes ? 0 : (a - k->base - k->bytes) / k->stride + 1;
            for (std::size_t i = lo; i <= hi; ++i) {
                if (!f(static_cast<std::int32_t>(i))) {
                    return false;
                }
            }
        }
        return true;
    }
    /// How many pieces a block has.
    [[nodiscard]] std::size_t pieces() const noexcept { return pieces_.size(); }

private:
    struct piece {
        std::size_t base, bytes, stride, end;
    };
    std::size_t page_bytes_;
    std::size_t max_blocks_;
    std::vector<piece> pieces_;  // by base
    bool disjoint_ = true;
};

/// The pages one eviction frees, block by block: called right after block `b` lost its last
/// reference, the bytes of b's pages that no live block (block_refs != 0) touches any more.
/// Evicting blocks one after another, a page is counted once: by the eviction of the last
/// block on it. The same sum as page_groups::evicted over the same evictions.
template <class Cache>
class eviction_pages {
    using layout_type = typename Cache::layout_type;

public:
    eviction_pages(const kv_geometry& g, std::size_t page_bytes) : map_(g, page_bytes), page_bytes_(page_bytes) {
        // A piece of w bytes touches at most w / page + 2 pages: no allocation in freed_by.
        std::size_t most = 0;
        layout_type::for_each_piece(g, 0, [&](std::size_t, std::size_t bytes) { most += bytes / page_bytes + 2; });
        pages_.reserve(most);
    }
    /// Never throws (the room for a block's pages is reserved).
    [[nodiscard]] std::size_t freed_by(const Cache& cache, std::int32_t b) noexcept {
        pages_.clear();
        for_each_block_page<layout_type>(cache.geometry(), page_bytes_, b, [&](std::size_t p) { pages_.push_back(p); });
        std::sort(pages_.begin(), pages_.end());
        pages_.erase(std::unique(pages_.begin(), pages_.end()), pages_.end());
        std::size_t freed = 0;
        for (std::size_t p : pages_) {
            if (map_.for_each_block_on_page(p, [&](std::int32_t id) { return cache.block_refs(id) == 0; })) {
                freed += page_bytes_;
            }
        }
        return freed;
    }

private:
    block_page_map<layout_type> map_;
    std::size_t page_bytes_;
    std::vector<std::size_t> pages_;  // scratch: one block's pages
};

} // namespace vmmpp::detail
