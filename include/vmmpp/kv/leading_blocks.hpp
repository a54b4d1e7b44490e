// vmmpp/kv/leading_blocks.hpp: detail::leading_blocks, the part of a kv_cache that lets go of a
// live sequence's first blocks while the sequence goes on (kv_cache::release_leading_blocks): a
// sliding-window layer group's blocks that left the window (vmmpp/groups/sliding_window.hpp).
// Each released position keeps a placeholder block in the table, a live block the caller holds,
// so fork, free, truncate and the block tables stay as they are. The call, its documentation and
// guarantee are kv_cache's; this is where it is done.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache_options.hpp"

namespace vmmpp::detail {

/// kv_cache's release of a sequence's leading blocks (a friend of the cache).
template <class Cache>
struct leading_blocks {
    /// kv_cache::release_leading_blocks.
    static std::size_t release(Cache& c, seq_id seq, std::size_t count, std::int32_t placeholder,
                               cudaStream_t stream) {
        c.sleep_.refuse("release_leading_blocks");  // the blocks hold no memory
        c.check_shares("release_leading_blocks");   // every released position shares the placeholder
        auto& s = c.find(seq);
        if (count > s.blocks.size()) {
            throw invalid_argument("release_leading_blocks of " + std::to_string(count) + " blocks of sequence " +
                                   std::to_string(seq) + ": it has only " + std::to_string(s.blocks.size()));
        }
        if (c.blocks_.refs(placeholder) == 0) {  // refs throws for an id out of range
            throw invalid_argument("release_leading_blocks: placeholder block " + std::to_string(placeholder) +
                                   " is free (the caller must hold it: take_block or retain_block)");
        }
        std::vector<std::int32_t> dropped;  // may throw: nothing changed yet
        for (std::size_t i = 0; i < count; ++i) {
            if (s.blocks[i] != placeholder) {
                dropped.push_back(s.blocks[i]);
            }
        }
        if (dropped.empty()) {
            return 0;
        }
        // A partly filled last block stays: only whole blocks before the sequence's end go.
        if (count == s.blocks.size() && s.tokens % c.geometry_.block_tokens != 0) {
            throw invalid_argument("release_leading_blocks of all " + std::to_string(count) + " blocks of sequence " +
                                   std::to_string(seq) + ": its last block is still being filled");
        }
        c.memory_.prepare_drop(dropped, stream, c.blocks_);  // may throw: nothing changed
        for (std::size_t i = 0; i < count; ++i) {
            if (s.blocks[i] != placeholder) {
                s.blocks[i] = placeholder;
                c.blocks_.retain(placeholder);  // a live id: never throws
            }
        }
        c.memory_.drop(dropped, c.blocks_);
        return dropped.size();
    }
};

}  // namespace vmmpp::detail
