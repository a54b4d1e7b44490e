// vmmpp/kv/block_fences.hpp: per block, the fences of the streams that may still read it. A
// block read on several streams (shared by forks, each freed on its own stream) goes back, and
// is written again, only after all of them: its memory is released after every fence here, and
// the stream that writes it next waits for those not yet complete.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "vmmpp/pool.hpp"

namespace vmmpp {

/// The fences each block id waits for: at most one per stream (pool lane), the newest.
class block_fences {
public:
    explicit block_fences(std::uint32_t max_blocks) : fences_(max_blocks) {}

    /// Block `b` may be read by the work before `f` (a no-op for no fence). May allocate.
    void add(std::int32_t b, const pool_fence& f) { add_to(fences_[static_cast<std::size_t>(b)], f); }
    /// Makes room for one more fence on block `b`, so that the next add(b, f) cannot fail.
    /// Throws: std::bad_alloc (nothing changed).
    void reserve_one_more(std::int32_t b) {
        auto& set = fences_[static_cast<std::size_t>(b)];
        set.reserve(set.size() + 1);
    }
    /// The fences of block `b`.
    [[nodiscard]] std::span<const pool_fence> of(std::int32_t b) const noexcept {
        return fences_[static_cast<std::size_t>(b)];
    }
    /// The fences of block `b`, for dropping the completed ones (elastic_pool::make_wait).
    [[nodiscard]] std::vector<pool_fence>& of_mutable(std::int32_t b) noexcept { return fences_[static_cast<std::size_t>(b)]; }

    /// Adds `f` to `set`, keeping the newest fence per pool lane. May allocate.
    static void add_to(std::vector<pool_fence>& set, const pool_fence& f) {
        if (f.value == 0) {
            return;
        }
        for (pool_fence& g : set) {
            if (g.pool == f.pool && g.lane == f.lane) {
                g.value = std::max(g.value, f.value);
                return;
            }
        }
        set.push_back(f);
    }

private:
    std::vector<std::vector<pool_fence>> fences_;
};

} // namespace vmmpp
