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
#include <new>
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
        list_pieces(blocks, pieces);
        return merged(pieces);
    }
    /// As merged_pieces, for the hold of the same blocks that follows (an append's prepay, say):
    /// their pieces are listed once for both.
    [[nodiscard]] std::vector<byte_range> merged_pieces_for_hold(std::span<const std::int32_t> blocks) {
        return merged(pieces_of(blocks));
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
            std::vector<byte_range> runs = merged_pieces_for_hold(fresh);  // single pages are left to the holds
            std::erase_if(runs, [&](const byte_range& r) { return r.bytes <= pool_.page_bytes(); });
            try {
                pool_.commit_ahead(runs);
            } catch (...) {
                // Strong: nothing committed. The hold that follows commits run by run and
                // reports what refuses it, as without this step.
            }
        }
    }

    /// Holds every piece of the memory of `blocks` in the pool, or none: one pool call, whose
    /// holds per page are those of one hold per piece.
    void hold(std::span<const std::int32_t> blocks) { pool_.ensure_committed(pieces_of(blocks)); }

    /// Releases every piece of `blocks` (all held), to go back after `after`, in one pool call;
    /// returns its error (the release has taken effect; see elastic_pool::release). Without
    /// memory to list the pieces, releases them one by one, as they come.
    std::exception_ptr unhold(std::span<const std::int32_t> blocks, pool_fence after) {
        std::exception_ptr first;
        try {
            std::span<const byte_range> pieces;
            try {
                pieces = pieces_of(blocks);
            } catch (const std::bad_alloc&) {
                for_each_piece(blocks, [&](std::size_t off, std::size_t bytes) {
                    try {
                        pool_.release(off, bytes, after);
                    } catch (...) {
                        first = first ? first : std::current_exception();
                    }
                });
                return first;
            }
            pool_.release(pieces, after);
        } catch (...) {
            first = std::current_exception();
        }
        return first;
    }
    void unhold_noexcept(std::span<const std::int32_t> blocks, pool_fence after) noexcept { (void)unhold(blocks, after); }

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
        std::vector<std::int32_t> last;  // the blocks that lose their last reference
        for (std::int32_t b : blocks) {
            if (ids.refs(b) == 1) {
                last.push_back(b);
                for (const pool_fence& f : fences_.of(b)) {
                    block_fences::add_to(released_fences_, f);
                }
            }
        }
        list_pieces(last, released_pieces_);  // sorted: the pool's books walk them page by page
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
    template <class F>
    void for_each_piece(std::span<const std::int32_t> blocks, F&& f) const {
        for (std::int32_t b : blocks) {
            Layout::for_each_piece(geometry_, static_cast<std::uint32_t>(b), f);
        }
    }
    /// The pieces of `blocks`, sorted by offset (list_pieces), listed once for the calls of an
    /// append or take on the same blocks (prepay, commit ahead, hold): kept until the next call
    /// asks for other blocks.
    std::span<const byte_range> pieces_of(std::span<const std::int32_t> blocks) {
        if (!std::ranges::equal(blocks, pieces_blocks_)) {
            pieces_blocks_.clear();
            list_pieces(blocks, pieces_);
            pieces_blocks_.assign(blocks.begin(), blocks.end());
        }
        return pieces_;
    }
    /// Sorted pieces with adjacent ones merged.
    static std::vector<byte_range> merged(std::span<const byte_range> pieces) {
        std::vector<byte_range> runs;
        for (const byte_range& p : pieces) {
            if (!runs.empty() && runs.back().offset + runs.back().bytes == p.offset) {
                runs.back().bytes += p.bytes;
            } else {
                runs.push_back(p);
            }
        }
        return runs;
    }
    /// Sets `out` to the pieces of `blocks` sorted by offset, one per piece: a page under k
    /// pieces is held k times, as by one hold per piece. Every layout places a block's piece i
    /// at region i + block x stride, so piece by piece over ascending blocks they come sorted:
    /// only a layout that is not so pays a sort, which cost more than the holds for a prompt's
    /// 16384 layer_major pieces.
    void list_pieces(std::span<const std::int32_t> blocks, std::vector<byte_range>& out) const {
        std::vector<std::int32_t> sorted;
        if (!std::is_sorted(blocks.begin(), blocks.end())) {
            sorted.assign(blocks.begin(), blocks.end());
            std::sort(sorted.begin(), sorted.end());
            blocks = sorted;
        }
        if (blocks.size() < 2 || !list_piece_by_piece(blocks, out)) {
            out.clear();
            for_each_piece(blocks, [&](std::size_t off, std::size_t bytes) { out.push_back({off, bytes}); });
        }
        const auto by_offset = [](const byte_range& a, const byte_range& b) { return a.offset < b.offset; };
        if (!std::is_sorted(out.begin(), out.end(), by_offset)) {
            std::sort(out.begin(), out.end(), by_offset);
        }
    }
    /// Sets `out` to the pieces of `blocks` piece by piece (every block's first piece, then every
    /// block's second...), listed a few blocks at a time so that the writes stay in cache; false
    /// for blocks of different piece counts.
    bool list_piece_by_piece(std::span<const std::int32_t> blocks, std::vector<byte_range>& out) const {
        const std::size_t n = blocks.size();
        std::size_t k = 0;  // pieces per block
        for_each_piece(blocks.first(1), [&](std::size_t, std::size_t) { ++k; });
        constexpr std::size_t tile = 16;  // blocks listed at a time
        std::vector<byte_range> rows;     // their pieces, block by block
        rows.reserve(tile * k);
        out.resize(n * k);
        for (std::size_t j0 = 0; j0 < n; j0 += tile) {
            const std::size_t m = std::min(tile, n - j0);
            rows.clear();
            for (std::size_t j = 0; j < m; ++j) {
                for_each_piece(blocks.subspan(j0 + j, 1), [&](std::size_t off, std::size_t bytes) { rows.push_back({off, bytes}); });
                if (rows.size() != (j + 1) * k) {
                    return false;
                }
            }
            for (std::size_t i = 0; i < k; ++i) {
                for (std::size_t j = 0; j < m; ++j) {
                    out[i * n + j0 + j] = rows[j * k + i];
                }
            }
        }
        return true;
    }
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
    std::vector<byte_range> pieces_;           // the pieces of pieces_blocks_, sorted (pieces_of)
    std::vector<std::int32_t> pieces_blocks_;
    std::vector<byte_range> released_pieces_;  // what the free or truncate in progress releases
    std::vector<pool_fence> released_fences_;  // and the fences that memory waits for
    bool copies_queued_ = false;               // copies queued on own_stream_ since its last fence
};

} // namespace vmmpp::detail
