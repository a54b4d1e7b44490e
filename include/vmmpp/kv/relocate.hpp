// vmmpp/kv/relocate.hpp: moving a block that only its caller holds down to the lowest free id,
// so that the pages above empty and go back (a prefix cache compacting its cached blocks,
// vmmpp/prefix/compaction.hpp). The bytes move with copy_blocks, in the cache's stream order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <string>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"

namespace vmmpp {

/// Moves live block `from`, whose one reference the caller holds (retain_block; no sequence holds
/// it), to the lowest free id `to` if that lies below `from`, and returns `to`; returns `from`
/// when no lower id is free (nothing changed). In order:
/// 1. `to` is taken (kv_cache::take_block): `stream` waits for the reads queued before `to`'s
///    last free;
/// 2. `stream` waits for the work behind `from`'s fences (the engine's last writes and reads,
///    queued before its sequence's free, on any stream), then the bytes are copied on `stream`
///    (copy_blocks: both blocks get a fence after the copy);
/// 3. `on_moved(to)` (noexcept) lets the caller re-key its books;
/// 4. the caller's reference moves: release_block(from, stream), so `from`'s memory goes back only
///    after the copy and after every stream that read it before (its fences), never under them.
/// Reads of `from` the caller queues later must use `to`.
/// Throws: invalid_argument (`from` out of range, free, or held by others: its reference count
/// is named); what take_block and copy_blocks throw (nothing changed: `to` is given back);
/// cuda_error from release_block: recording its fence (nothing changed: `to` is given back and
/// on_moved(from) undoes the re-keying) or giving memory back (the move has taken effect).
template <class Config, class Layout, class OnMoved>
std::int32_t relocate_block(kv_cache<Config, Layout>& cache, std::int32_t from, cudaStream_t stream,
                            OnMoved&& on_moved) {
    static_assert(noexcept(on_moved(from)), "vmmpp::relocate_block: on_moved must not throw");
    if (const auto refs = cache.block_refs(from); refs != 1) {  // block_refs throws for an id out of range
        throw invalid_argument("relocate_block: block " + std::to_string(from) + " has " + std::to_string(refs) +
                               " references: only a live block whose one reference is the caller's can move");
    }
    const std::int32_t to = cache.take_block(stream);
    const auto give_back = [&] {
        try {
            cache.release_block(to, stream);
        } catch (...) {
            // a lost context: the id is free again all the same, its memory retired by the pool
        }
    };
    if (to > from) {
        give_back();
        return from;
    }
    const std::int32_t src[1] = {from}, dst[1] = {to};
    try {
        // `stream` waits for the work that last wrote `from` (on whatever stream freed its
        // sequence: the fences on it), so the copy reads the block's final bytes.
        cache.order_outside_write(std::span<const std::int32_t>(src), stream);
        copy_blocks(cache, std::span<const std::int32_t>(src), cache, std::span<const std::int32_t>(dst), stream);
    } catch (...) {
        give_back();
        throw;
    }
    on_moved(to);
    try {
        cache.release_block(from, stream);
    } catch (...) {
        if (cache.block_refs(from) != 0) {  // the fence was not recorded: nothing changed
            on_moved(from);
            give_back();
        }
        throw;
    }
    return to;
}

} // namespace vmmpp
