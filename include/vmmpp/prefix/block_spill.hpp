// vmmpp/prefix/block_spill.hpp: where a prefix cache's evicted blocks can go instead of being
// dropped: a lower tier (vmmpp/tier/host_tier.hpp keeps them in pinned host memory; a disk or
// remote tier would implement the same interface).
#pragma once

#include <cstdint>
#include <span>

#include "vmmpp/prefix/block_hash.hpp"

namespace vmmpp {

/// A lower tier a prefix_cache offers its victims to (prefix_cache::spill_to).
///
/// spill() is called with blocks about to be evicted, in eviction order, and their keys: the
/// blocks are still held (reference count 1) and their bytes are their keys' tokens'. A tier
/// keeps what it can by queueing copies of them, ordered after the work fenced on them
/// (kv_cache::order_reads_after_fences) and fenced themselves (copy_blocks does both ends), so the
/// blocks' memory goes back, and their ids are written again, only after the copies. It must not
/// throw: a block it cannot keep (no room, a copy refused) is simply dropped, as with no tier.
class block_spill {
public:
    virtual void spill(std::span<const std::int32_t> blocks, std::span<const block_key> keys) noexcept = 0;

protected:
    block_spill() = default;
    block_spill(const block_spill&) = default;
    block_spill& operator=(const block_spill&) = default;
    ~block_spill() = default;  // not owned through this interface
};

} // namespace vmmpp
