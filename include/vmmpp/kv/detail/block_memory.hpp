// vmmpp/kv/detail/block_memory.hpp: the memory under a kv_cache's blocks, in stream order. Holds
// a block's pieces (Layout::for_each_piece) in the pool and releases them after the GPU work
// that may still read them; keeps per block the fences of its readers (block_fences), so that a
// block's memory goes back, and the block is written again, only after all of them. Which blocks
// are live is the block-id policy's to say (its reference counts), not this part's.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/kv/block_fences.hpp"
#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp::detail {

template <class Pool, class Layout>
class block_memory {
public:
    /// Whether GPU work may read the blocks (device-visible memory): then every block let go of
    /// carries the fences of its readers, its memory goes back after them, and its next writer
    /// waits for them. Host memory needs none of this.
    static constexpr bool stream_ordered = has_property<typename Pool::backing_type, device_accessible>;

    /// Blocks of `pool` laid out by `Layout` over `geometry`; `own_stream` runs the cache's own
    /// copies. `pool` and `geometry` must outlive this.
    block_memory(Pool& pool, const kv_geometry& geometry, cudaStream_t own_stream)
        : pool_(pool), geometry_(geometry), own_stream_(own_stream), fences_(geometry.max_blocks) {}
    block_memory(const block_memory&) = delete;
    block_memory& operator=(const block_memory&) = delete;
    /// The pool waits for the cache's queued copies (and every fence recorded) before it unmaps.
    ~block_memory() {
        if (copies_queued_) {
            try {
                (void)pool_.record_fence(own_stream_);
            } catch (...) {
                // the stream's context is gone: its copies cannot run any more
            }
        }
    }

    /// The pieces of `blocks`, sorted by offset, adjacent ones merged (sleep copies them, an
    /// append prepays and commits them ahead).
    [[nodiscard]] std::vector<byte_range> merged_pieces(std::span<const std::int32_t> blocks) const {
        std::vector<byte_range> pieces;
        for (std::int32_t b : blocks) {
            Layout::for_each_piece(geometry_, static_cast<std::uint32_t>(b),
                                   [&](std::size_t off, std::size_t bytes) { pieces.push_back({off, bytes}); });
        }
        std::sort(pieces.begin(), pieces.end(), [](const byte_range& a, const byte_range& b) { return a.offset < b.offset; });
        std::vector<byte_range> merged;
        for (const byte_range& p : pieces) {
            if (!merged.empty() && merged.back().offset + merged.back().bytes == p.offset) {
                merged.back().bytes += p.bytes;
            } else {
                merged.push_back(p);
            }
        }
        return merged;
    }

    /// With a pool that commits extents: commits the pages under the fresh blocks of one append
    /// ahead of their holds, adjacent pieces merged, so a prompt's blocks share extents (one
    /// handle per run instead of one per block) that empty when its sequence ends. Other pools
    /// commit a unit at a time whatever they are told, so there is nothing to do ahead.
    void commit_ahead(std::span<const std::int32_t> fresh) {
        if constexpr (Pool::commits_extents) {
            if (fresh.size() < 2) {
                return;  // one block: the pool's own growth rule decides
            }
            std::vector<byte_range> runs = merged_pieces(fresh);  // single pages are left to the holds
            std::erase_if(runs, [&](const byte_range& r) { return r.bytes <= pool_.page_bytes(); });
            try {
                pool_.commit_ahead(runs);
            } catch (...) {
                // Strong: nothing committed. The holds that follow commit block by block and
                // report what refuses them, as without this step.
            }
        }
    }

    /// Holds every piece of block `b`'s memory in the pool, or none.
    void hold(std::int32_t b) {
        std::size_t held = 0;
        try {
            Layout::for_each_piece(geometry_, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
                pool_.ensure_committed(off, bytes);
                ++held;
            });
        } catch (...) {
            // The pieces come in the same order every time: release the first `held` again.
            Layout::for_each_piece(geometry_, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
                if (held > 0) {
                    --held;
                    try {
                        pool_.release(off, bytes);  // nothing was queued on this block yet
                    } catch (...) {
                        // the release took effect; only giving a page back failed (the pool retired it)
                    }
                }
            });
            throw;
        }
    }

    /// Releases every piece of block `b`, to go back after `after`; returns the first error
    /// after releasing them all.
    std::exception_ptr unhold(std::int32_t b, pool_fence after) {
        std::exception_ptr first;
        Layout::for_each_piece(geometry_, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
            try {
                pool_.release(off, bytes, after);
            } catch (...) {
                if (!first) {
                    first = std::current_exception();
                }
            }
        });
        return first;
    }
    void unhold_noexcept(std::int32_t b, pool_fence after) noexcept { (void)unhold(b, after); }

    /// Fresh blocks of an append, some perhaps freed while reads queued before their free may
    /// still run: `stream`, which writes them next (the engine's tokens, a copy-on-write), waits
    /// for those reads. The fences stay with the block (completed ones are dropped): memory goes
    /// back only after its old readers too, whatever stream frees it next.
    void order_writes_after_reads(std::span<const std::int32_t> fresh, cudaStream_t stream) {
        if constexpr (stream_ordered) {
            for (std::int32_t b : fresh) {
                if (!fences_.of(b).empty()) {
                    pool_.make_wait(stream, fences_.of_mutable(b));
                }
            }
        }
    }

    /// Before a copy queued outside the cache (copy_blocks) that reads or writes `blocks`: makes
    /// room for the fence add_fence puts on each after it, so that cannot fail once the copy is
    /// queued. Host memory needs no fences. Throws: std::bad_alloc (nothing changed).
    void reserve_fences(std::span<const std::int32_t> blocks) {
        if constexpr (stream_ordered) {
            for (std::int32_t b : blocks) {
                fences_.reserve_one_more(b);
            }
        }
    }
    /// After that copy: whoever lets go of any of `blocks` last waits for `f`, a fence of the pool
    /// after it. One fence per call and block: reserve_fences made the room.
    void add_fence(std::span<const std::int32_t> blocks, pool_fence f) noexcept {
        if constexpr (stream_ordered) {
            for (std::int32_t b : blocks) {
                fences_.add(b, f);
            }
        }
    }

    /// Call before queueing a copy of the cache's own on `stream`: a later row may fail after
    /// one is queued.
    void copy_queued(cudaStream_t stream) noexcept {
        copies_queued_ = copies_queued_ || (stream_ordered && stream == own_stream_);
    }
    /// After a copy from block `from` to block `to` queued on `stream`: whoever lets go of either
    /// block last waits for it too.
    void copied(std::int32_t from, std::int32_t to, cudaStream_t stream) {
        if constexpr (stream_ordered) {
            const pool_fence f = pool_.record_fence(stream);
            fences_.add(from, f);
            fences_.add(to, f);
        }
    }
    /// A fence after the work a failed append may have queued into its fresh blocks (a copy on
    /// `stream` if `copied`, else the cache's own copies), or none if that fails (a lost context).
    pool_fence failed_append_fence(bool copied, cudaStream_t stream) noexcept {
        if (copied && stream != own_stream_) {
            return fence_noexcept(stream);
        }
        return copies_queued_ ? fence_noexcept(own_stream_) : pool_fence{};
    }

    /// Before dropping one reference to each of `blocks` (of the policy `ids`), without changing
    /// anything the caller can see (a failure leaves at most an extra fence on a block, which
    /// only delays it): records a fence after the work queued on `stream` (and the cache's own
    /// copies), adds it to every block, shared or not, and lists the pieces of the blocks that
    /// lose their last reference and the fences their memory waits for (those of all of them:
    /// one release call in drop()).
    template <class BlockIds>
    void prepare_drop(std::span<const std::int32_t> blocks, cudaStream_t stream, const BlockIds& ids) {
        released_pieces_.clear();
        released_fences_.clear();
        if constexpr (stream_ordered) {
            if (!blocks.empty()) {
                const pool_fence read = pool_.record_fence(stream);
                const pool_fence copied =
                    copies_queued_ && stream != own_stream_ ? pool_.record_fence(own_stream_) : pool_fence{};
                copies_queued_ = false;  // the fence on own_stream_ (one of the two) covers every copy so far
                for (std::int32_t b : blocks) {
                    fences_.add(b, read);
                    fences_.add(b, copied);
                }
            }
        }
        for (std::int32_t b : blocks) {
            if (ids.refs(b) == 1) {
                Layout::for_each_piece(geometry_, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
                    released_pieces_.push_back({off, bytes});
                });
                for (const pool_fence& f : fences_.of(b)) {
                    block_fences::add_to(released_fences_, f);
                }
            }
        }
    }
    /// Drops one reference to each block of `dropped` (prepare_drop listed the pieces of those
    /// that reach zero and their fences) and releases that memory after those fences, in one
    /// pool call: one lock, one give-back.
    template <class BlockIds>
    void drop(std::span<const std::int32_t> dropped, BlockIds& ids) {
        for (std::int32_t b : dropped) {
            (void)ids.release(b);  // live ids: never throws
        }
        if (!released_pieces_.empty()) {
            pool_.release(std::span<const byte_range>(released_pieces_), std::span<const pool_fence>(released_fences_));
        }
    }

    /// Device-visible memory: waits for the work queued on `stream` so far (and every fence of
    /// the pool), through a pool fence. Host memory: nothing to wait for.
    void wait_for_device(cudaStream_t stream) {
        if constexpr (stream_ordered) {
            (void)pool_.record_fence(stream);
            if (stream == own_stream_) {
                copies_queued_ = false;  // the fence covers the cache's own copies
            }
            (void)pool_.synchronize();
        }
    }
    void wait_for_device_noexcept(cudaStream_t stream) noexcept {
        try {
            wait_for_device(stream);
        } catch (...) {
            // the context is gone: nothing queued runs any more
        }
    }

private:
    /// A fence after the work queued on `stream`, or none if that fails (a lost context).
    pool_fence fence_noexcept(cudaStream_t stream) noexcept {
        if constexpr (stream_ordered) {
            try {
                return pool_.record_fence(stream);
            } catch (...) {
            }
        }
        return {};
    }

    Pool& pool_;
    const kv_geometry& geometry_;
    cudaStream_t own_stream_;
    block_fences fences_;                      // per block: the streams that may still read it
    std::vector<byte_range> released_pieces_;  // what the free or truncate in progress releases
    std::vector<pool_fence> released_fences_;  // and the fences that memory waits for
    bool copies_queued_ = false;               // copies queued on own_stream_ since its last fence
};

} // namespace vmmpp::detail
