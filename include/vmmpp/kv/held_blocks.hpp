// vmmpp/kv/held_blocks.hpp: detail::held_blocks, the part of a kv_cache that serves holders of
// blocks other than its sequences (a prefix cache, vmmpp/prefix/): a sequence over blocks it
// already holds (kv_cache::adopt), one more reference to a live block (retain_block), a fresh
// block no sequence holds (take_block, for moving a block's bytes: vmmpp/kv/relocate.hpp), and
// dropping such a reference in stream order (release_block). The calls, their documentation and
// guarantees are kv_cache's; this is where they are done.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache_options.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp::detail {

/// kv_cache's calls for holders of blocks other than its sequences (a friend of the cache).
template <class Cache>
struct held_blocks {
    /// kv_cache::adopt.
    [[nodiscard]] static seq_id adopt(Cache& c, std::span<const std::int32_t> blocks, std::size_t n_tokens) {
        c.check_shares("adopt");
        const auto& g = c.geometry_;
        if (g.blocks_for(n_tokens) != blocks.size() || n_tokens > std::size_t{g.max_blocks} * g.block_tokens) {
            throw invalid_argument("adopt of " + std::to_string(blocks.size()) + " blocks for " +
                                   std::to_string(n_tokens) + " tokens: those tokens need " +
                                   std::to_string(g.blocks_for(n_tokens)) + " blocks of " +
                                   std::to_string(g.block_tokens) + " tokens");
        }
        std::vector<std::int32_t> sorted(blocks.begin(), blocks.end());  // may throw: nothing changed yet
        std::sort(sorted.begin(), sorted.end());
        for (std::size_t i = 0; i < sorted.size(); ++i) {
            if (c.blocks_.refs(sorted[i]) == 0) {  // refs throws for an id out of range
                throw invalid_argument("adopt: block " + std::to_string(sorted[i]) + " is free");
            }
            if (i > 0 && sorted[i] == sorted[i - 1]) {
                throw invalid_argument("adopt: block " + std::to_string(sorted[i]) + " given twice");
            }
        }
        typename Cache::sequence s{std::vector<std::int32_t>(blocks.begin(), blocks.end()), n_tokens};  // may throw
        const seq_id id = c.add_sequence();  // may throw: nothing changed yet
        auto& added = c.sequences_.at(id);
        s.slot = added.slot;
        added = std::move(s);  // nothrow
        for (std::int32_t b : added.blocks) {
            c.blocks_.retain(b);  // live ids: never throws
        }
        return id;
    }

    /// kv_cache::retain_block.
    static void retain(Cache& c, std::int32_t block) {
        c.check_shares("retain_block");  // a layout that cannot share cannot keep a block for another holder
        c.blocks_.retain(block);
    }

    /// kv_cache::take_block.
    [[nodiscard]] static std::int32_t take(Cache& c, cudaStream_t stream) {
        c.sleep_.refuse("take_block");  // no memory to hold
        c.check_shares("take_block");   // a block no sequence holds: only where blocks can be shared
        if (c.blocks_.free_blocks() == 0) {
            throw out_of_blocks(1, 0, c.blocks_.max_blocks());
        }
        const std::int32_t one[1] = {c.blocks_.allocate(0, 0)};
        bool held = false;
        try {
            const auto prepaid = c.pool_.prepay(c.memory_.merged_pieces_for_hold(one));
            c.memory_.hold(one);
            held = true;
            c.memory_.order_writes_after_reads(one, stream);
        } catch (...) {
            c.blocks_.release(one[0]);
            if (held) {
                c.memory_.unhold_noexcept(one, pool_fence{});  // nothing was queued on it
            }
            throw;
        }
        return one[0];
    }

    /// kv_cache::release_block.
    static void release(Cache& c, std::int32_t block, cudaStream_t stream) {
        c.sleep_.refuse("release_block");  // the block holds no memory
        c.check_shares("release_block");   // no reference here but a sequence's, which free drops
        if (c.blocks_.refs(block) == 0) {
            throw invalid_argument("release_block: block " + std::to_string(block) + " is free (double release?)");
        }
        const std::int32_t one[1] = {block};
        c.memory_.prepare_drop(std::span<const std::int32_t>(one), stream, c.blocks_);  // may throw: nothing changed
        c.memory_.drop(std::span<const std::int32_t>(one), c.blocks_);
    }
};

}  // namespace vmmpp::detail
