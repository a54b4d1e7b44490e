// vmmpp/tier/host_tier.hpp: a second tier behind a GPU prefix cache, in page-locked host memory
// (vLLM's CPU offloading, SGLang's HiCache, LMCache's CPU tier). Evicted cached blocks are copied
// to the host instead of being dropped (when the tier has room); a prompt whose prefix continues
// in the host tier gets those blocks copied back into fresh GPU blocks; a preempted sequence is
// swapped out to the host and back in (vLLM's swap preemption) instead of being recomputed.
//
// Every copy runs on the tier's own stream, in one batch per call (copy_blocks: one
// cudaMemcpyBatchAsync between the GPU and pinned memory, or, for a GPU layout of small pieces,
// a gather through a staging buffer and a DMA per block), in the caches' stream order: the
// copy of an evicted block first waits for the work fenced on it, and fences it, so its GPU
// memory goes back (and its id is written again) only after the copy; a loaded block's readers
// wait for the copy. Host blocks are read and written by the tier's stream only, so a host block
// given up and reused is rewritten after the copies queued before, with no wait on the host.
//
// Other tiers (disk through GDS, remote memory through NIXL) would implement block_spill
// (vmmpp/prefix/block_spill.hpp) and a load path like attach's here: docs/HOST_TIER.md.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/event.hpp"
#include "vmmpp/kv/blocks_contiguous.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/prefix/block_spill.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/tier/host_store.hpp"

namespace vmmpp {

/// Options of a host_tier.
struct host_tier_options {
    /// Host blocks (each a GPU block's bytes): the tier's budget, committed (and page-locked)
    /// when the tier is made.
    std::size_t max_blocks = 0;
    /// The stream every tier copy runs on (the engine's; a low-priority non-blocking stream keeps
    /// copies out of the way of decode kernels). Must not be the legacy default stream, which
    /// the batched copies refuse and which would serialise with every blocking stream.
    cudaStream_t stream = nullptr;
};

/// What a host tier did since it was made, and what it holds.
struct host_tier_stats {
    std::uint64_t offloaded_blocks = 0;  ///< evicted GPU blocks copied to the host
    std::uint64_t stored_ahead_blocks = 0;  ///< cached GPU blocks copied ahead of eviction (store_ahead)
    std::uint64_t dropped_blocks = 0;    ///< evicted GPU blocks the tier could not keep (no room, a refused copy)
    std::uint64_t loaded_blocks = 0;     ///< host blocks copied back by attach
    std::uint64_t host_hits = 0;         ///< blocks attach found in the host tier (not on the GPU)
    std::uint64_t evicted_blocks = 0;    ///< keyed host blocks given up for room
    std::uint64_t swapped_out = 0, swapped_in = 0;  ///< sequences
    std::uint64_t bytes_to_host = 0, bytes_to_device = 0;
    std::size_t keyed_blocks = 0;    ///< host blocks holding a prefix block
    std::size_t swapped_blocks = 0;  ///< host blocks holding swapped-out sequences
    std::size_t free_blocks = 0;
    std::size_t max_blocks = 0;
};

/// A sequence made by host_tier::attach: `cached_tokens` leading tokens in its blocks, of which
/// `host_tokens` were copied back from the host tier.
struct tiered_sequence {
    seq_id seq;
    std::size_t cached_tokens;
    std::size_t host_tokens;
};

/// The host tier of `Prefix`, a prefix_cache over a GPU kv_cache, in a host kv_cache of
/// `HostConfig` (pinned_host_config: page-locked, committed once) with the same block shape, each
/// block in one range (blocks_contiguous over the GPU cache's layout). Made, it receives the prefix cache's evicted blocks (prefix_cache::spill_to);
/// destroyed, it stops, after its copies are done.
///
/// Thread safety: as the prefix cache's (external synchronisation; the prefix cache calls the
/// tier from its evictions).
template <class Prefix, class HostConfig = pinned_host_config>
class host_tier final : public block_spill {
    using gpu_cache = typename Prefix::cache_type;
    using layout_type = typename gpu_cache::layout_type;
    // A cache in host memory (host_config: CPU engines, tests) copies at once: no stream, no events.
    static constexpr bool on_device = has_property<typename gpu_cache::backing_type, device_accessible>;

public:
    using prefix_type = Prefix;
    /// The host blocks: the GPU layout's pieces of a block kept together (blocks_contiguous), so
    /// that a block moves in one DMA (small pieces go through a staging buffer: copy_blocks).
    using host_cache_type = kv_cache<HostConfig, blocks_contiguous<layout_type>>;

    /// Throws: invalid_argument (max_blocks 0, the legacy default stream), what the host cache's
    /// construction throws (out_of_memory, cuda_error registering the memory).
    host_tier(Prefix& prefix, host_tier_options options,
              typename HostConfig::backing_type::options backing_options = {})
        : prefix_(prefix), gpu_(prefix.cache()), stream_(checked(options).stream),
          host_(host_geometry(gpu_.geometry(), options.max_blocks), on_gpu_device(std::move(backing_options))) {
        if constexpr (on_device) {
            context_.emplace(gpu_.pool().device());
            scoped_context current(*context_);
            done_ = stream_event::create();
        }
        prefix_.spill_to(this);
    }
    host_tier(const host_tier&) = delete;
    host_tier& operator=(const host_tier&) = delete;
    ~host_tier() {
        prefix_.spill_to(nullptr);
        try {
            synchronize();  // the host memory goes with the host cache: no copy may still use it
        } catch (...) {
        }
    }

    // --- the prefix tier ---

    /// block_spill: keeps copies of evicted GPU blocks (prefix_cache's evictions call it). Makes
    /// room by giving up the oldest keyed host blocks; keeps the newest victims when not all fit.
    void spill(std::span<const std::int32_t> blocks, std::span<const block_key> keys) noexcept override {
        std::vector<std::int32_t> src;
        std::vector<block_key> new_keys;
        try {
            for (std::size_t i = 0; i < blocks.size(); ++i) {
                if (const auto b = store_.block_of(keys[i])) {
                    store_.touch(*b);  // kept already (stored ahead, or loaded back earlier)
                } else {
                    src.push_back(blocks[i]);
                    new_keys.push_back(keys[i]);
                }
            }
            const std::size_t room = make_room(src.size());
            if (room < src.size()) {  // the oldest victims go
                stats_.dropped_blocks += src.size() - room;
                src.erase(src.begin(), src.end() - static_cast<std::ptrdiff_t>(room));
                new_keys.erase(new_keys.begin(), new_keys.end() - static_cast<std::ptrdiff_t>(room));
            }
            keep(src, new_keys);
            stats_.offloaded_blocks += src.size();
        } catch (...) {
            // a refused copy or std::bad_alloc: the victims are dropped, as with no tier
            stats_.dropped_blocks += src.size();
        }
    }

    /// Copies to the host, ahead of their eviction, up to `max_blocks` evictable cached blocks the
    /// tier does not hold yet, next to be evicted first (vLLM's offloading stores blocks as they
    /// are computed): their eviction then copies nothing, so memory asked for comes back without
    /// waiting for PCIe, and an engine that calls it every step with a small budget spreads the
    /// tier's traffic over its steps (bench_host_tier_gpu decode/paced_both) instead of bursts.
    /// Uses free host blocks only (a store ahead never gives up a kept block).
    /// Returns the blocks copied. Throws: cuda_error (nothing is recorded as kept).
    std::size_t store_ahead(std::size_t max_blocks) {
        std::vector<std::int32_t> src;
        std::vector<block_key> keys;
        const std::size_t room = std::min(max_blocks, host_.free_blocks());
        prefix_.for_each_evictable([&](std::int32_t b, const block_key& k) {
            if (src.size() >= room) {
                return false;
            }
            if (!store_.contains(k)) {
                src.push_back(b);
                keys.push_back(k);
            }
            return true;
        });
        if (src.empty()) {
            return 0;
        }
        keep(src, keys);
        stats_.stored_ahead_blocks += src.size();
        return src.size();
    }

    /// How many leading tokens of `tokens` are cached: on the GPU, then on the host, in whole
    /// blocks chained over `extra`.
    struct lookup_result {
        std::size_t gpu_tokens = 0;
        std::size_t host_tokens = 0;
    };
    [[nodiscard]] lookup_result lookup(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) const {
        const std::size_t bt = gpu_.geometry().block_tokens;
        const std::size_t gpu = prefix_.lookup(tokens, extra) / bt;
        std::size_t host = 0;
        for_each_block_key(tokens, bt, extra, [&](std::size_t i, const block_key& k) {
            if (i < gpu) {
                return true;
            }
            if (!store_.contains(k)) {
                return false;
            }
            ++host;
            return true;
        });
        return {gpu * bt, host * bt};
    }

    /// prefix_cache::attach, then the prefix's next blocks found in the host tier are appended
    /// (prefix_cache::append: cached GPU blocks are evicted for them as needed) and copied back
    /// on the tier's stream; `stream`, the engine's, waits for the copies before its next work,
    /// and the blocks are published on the GPU again. Where the GPU has no room for them (the
    /// append refused), the sequence keeps its GPU hits only: the rest is recomputed, as without
    /// a tier. The engine appends the tokens after cached_tokens.
    /// Throws: what prefix_cache::attach throws (nothing changed); cuda_error queueing the copies
    /// (the sequence is freed again).
    tiered_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                           cudaStream_t stream) {
        const std::size_t bt = gpu_.geometry().block_tokens;
        const attached_sequence a = prefix_.attach(tokens, extra, stream);
        std::vector<std::int32_t> from;
        for_each_block_key(tokens, bt, extra, [&](std::size_t i, const block_key& k) {
            if (i < a.cached_tokens / bt) {
                return true;
            }
            const auto b = store_.block_of(k);
            if (b) {
                from.push_back(*b);
            }
            return b.has_value();
        });
        if (from.empty()) {
            return {a.seq, a.cached_tokens, 0};
        }
        store_.pin(from);
        struct unpin {
            detail::host_store& s;
            ~unpin() { s.unpin_all(); }
        } unpin_at_exit{store_};
        try {
            prefix_.append(a.seq, from.size() * bt, stream_);  // may evict, and spill into this tier
        } catch (const out_of_blocks&) {
            return {a.seq, a.cached_tokens, 0};
        } catch (const over_quota&) {
            return {a.seq, a.cached_tokens, 0};
        } catch (const out_of_memory&) {
            return {a.seq, a.cached_tokens, 0};
        }
        const std::span<const std::int32_t> to = gpu_.block_table(a.seq).subspan(a.cached_tokens / bt, from.size());
        try {
            copy_blocks(host_, std::span<const std::int32_t>(from), gpu_, to, stream_);
            record_done();
            stream_waits_for_copies(stream);
        } catch (...) {
            prefix_.free(a.seq, stream_);
            throw;
        }
        for (std::int32_t b : from) {
            store_.touch(b);
        }
        const std::size_t cached = a.cached_tokens + from.size() * bt;
        try {
            prefix_.publish(a.seq, tokens.first(cached), extra);
        } catch (const std::bad_alloc&) {
            // the blocks are live and loaded; they just stay unregistered on the GPU
        }
        stats_.loaded_blocks += from.size();
        stats_.host_hits += from.size();
        stats_.bytes_to_device += from.size() * block_bytes();
        return {a.seq, cached, from.size() * bt};
    }
    tiered_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) {
        return attach(tokens, extra, gpu_.stream());
    }

    // --- swap preemption ---

    /// Copies every block of `seq` (its tokens were written by work queued on `stream`) to host
    /// blocks on the tier's stream and frees the sequence (prefix_cache::free on `stream`): its
    /// GPU memory goes back after the copy. Returns the id swap_in takes. Makes room by giving up
    /// the oldest keyed host blocks.
    /// Throws: tier_full (not enough host blocks even after giving up every keyed one: nothing
    /// changed), invalid_argument (unknown sequence), cuda_error (nothing changed but waits
    /// queued; the host blocks go back).
    std::uint64_t swap_out(seq_id seq, cudaStream_t stream) {
        const std::span<const std::int32_t> table = gpu_.block_table(seq);
        const std::size_t tokens = gpu_.tokens(seq);
        if (const std::size_t room = make_room(table.size()); room < table.size()) {
            throw tier_full("swap_out", table.size(), room, host_.geometry().max_blocks);
        }
        std::vector<std::int32_t> dst = take_host_blocks(table.size());
        std::uint64_t id = 0;
        try {
            stream_waits_for(stream);
            copy_blocks(gpu_, table, host_, std::span<const std::int32_t>(dst), stream_);
            record_done();
            id = store_.add_swapped({dst, tokens});
        } catch (...) {
            for (std::int32_t b : dst) {
                release_host(b);
            }
            throw;
        }
        prefix_.free(seq, stream);
        stats_.swapped_out += 1;
        stats_.bytes_to_host += dst.size() * block_bytes();
        return id;
    }

    /// A new sequence with the tokens of swapped-out sequence `id`, its blocks copied back on the
    /// tier's stream; `stream` waits for the copies. The host blocks go back to the tier.
    /// Throws: invalid_argument (unknown id); what prefix_cache::append throws for the room
    /// (out_of_blocks, over_quota, out_of_memory: nothing changed, the sequence stays swapped
    /// out); cuda_error (the new sequence is freed, the swapped copy kept).
    seq_id swap_in(std::uint64_t id, cudaStream_t stream) {
        const detail::host_store::swapped& s = store_.swap(id);
        const seq_id seq = gpu_.add_sequence();
        try {
            prefix_.append(seq, s.tokens, stream_);
            copy_blocks(host_, std::span<const std::int32_t>(s.blocks), gpu_, gpu_.block_table(seq), stream_);
            record_done();
            stream_waits_for_copies(stream);
        } catch (...) {
            gpu_.free(seq, stream_);
            throw;
        }
        stats_.bytes_to_device += s.blocks.size() * block_bytes();
        drop_swapped(id);
        stats_.swapped_in += 1;
        return seq;
    }

    /// Gives up swapped-out sequence `id` (the engine recomputes it, or it was cancelled).
    void drop_swapped(std::uint64_t id) {
        for (std::int32_t b : store_.swap(id).blocks) {
            release_host(b);  // rewritten only by later copies on the tier's stream
        }
        store_.remove_swapped(id);
    }
    [[nodiscard]] std::size_t swapped_tokens(std::uint64_t id) const { return store_.swap(id).tokens; }

    // --- the copies' progress ---

    /// Whether every copy queued so far has completed (never waits).
    [[nodiscard]] bool idle() const {
        if constexpr (!on_device) {
            return true;
        } else {
            scoped_context current(*context_);
            return done_.query();
        }
    }
    /// Blocks until every copy queued so far has completed.
    void synchronize() const {
        if constexpr (on_device) {
            scoped_context current(*context_);
            done_.synchronize();
        }
    }
    /// Makes `stream` wait for every copy queued so far (attach and swap_in do it for theirs).
    void stream_waits_for_copies(cudaStream_t stream) const {
        if constexpr (!on_device) {
            return;
        }
        scoped_context current(*context_);
        driver::check(driver::get().stream_wait_event(stream, done_.get(), 0), "cuStreamWaitEvent(host_tier)");
    }

    [[nodiscard]] host_tier_stats stats() const {
        host_tier_stats s = stats_;
        s.keyed_blocks = store_.keyed_blocks();
        s.swapped_blocks = store_.swapped_blocks();
        s.free_blocks = host_.free_blocks();
        s.max_blocks = host_.geometry().max_blocks;
        return s;
    }
    [[nodiscard]] std::size_t block_bytes() const noexcept { return prefix_.block_bytes(); }
    [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
    [[nodiscard]] const host_cache_type& host_cache() const noexcept { return host_; }
    [[nodiscard]] Prefix& prefix() const noexcept { return prefix_; }

private:
    static const host_tier_options& checked(const host_tier_options& o) {
        if (o.max_blocks == 0) {
            throw invalid_argument("vmmpp::host_tier: max_blocks must not be zero");
        }
        if (on_device && (o.stream == nullptr || o.stream == cudaStreamLegacy || o.stream == cudaStreamPerThread)) {
            throw invalid_argument("vmmpp::host_tier: give the tier a stream of its own (options.stream), not the "
                                   "legacy default stream: its copies are batched, and must not serialise with "
                                   "the engine's blocking streams");
        }
        return o;
    }
    /// Pinned memory is registered through the GPU's device (any device would do: portable).
    template <class O>
    O on_gpu_device(O o) const {
        if constexpr (requires { o.device; }) {
            o.device = gpu_.pool().device();
        }
        return o;
    }
    static kv_geometry host_geometry(kv_geometry g, std::size_t blocks) {
        g.max_blocks = blocks;
        return g;
    }

    /// Frees keyed host blocks (oldest first, not pinned) until `n` are free or none is left;
    /// returns how many are free then (at most n).
    std::size_t make_room(std::size_t n) {
        if (host_.free_blocks() < n) {
            for (std::int32_t b : store_.oldest(n - host_.free_blocks())) {
                store_.remove(b);
                release_host(b);
                ++stats_.evicted_blocks;
            }
        }
        return std::min(n, host_.free_blocks());
    }
    /// Copies GPU blocks `src` (cached, evictable) into free host blocks kept under `keys` (room
    /// made first): the tier's stream waits for the work fenced on them, and they are fenced with
    /// the copy. Throws: cuda_error, std::bad_alloc: no host block is kept (those taken go back;
    /// a queued copy into them is overwritten only by later copies on the stream).
    void keep(std::span<const std::int32_t> src, std::span<const block_key> keys) {
        std::vector<std::int32_t> dst = take_host_blocks(src.size());
        try {
            gpu_.order_reads_after_fences(src, stream_);  // after the writes of the KV
            copy_blocks(gpu_, src, host_, std::span<const std::int32_t>(dst), stream_);
            record_done();
            for (std::size_t i = 0; i < dst.size(); ++i) {
                store_.add(keys[i], dst[i]);
            }
        } catch (...) {
            for (std::int32_t b : dst) {
                store_.remove(b);  // if it was kept already
                release_host(b);
            }
            throw;
        }
        stats_.bytes_to_host += dst.size() * block_bytes();
    }

    /// `n` free host blocks, held (make_room first). Strong.
    std::vector<std::int32_t> take_host_blocks(std::size_t n) {
        std::vector<std::int32_t> out;
        out.reserve(n);
        try {
            while (out.size() < n) {
                out.push_back(host_.take_block(stream_));
            }
        } catch (...) {
            for (std::int32_t b : out) {
                release_host(b);
            }
            throw;
        }
        return out;
    }
    void release_host(std::int32_t b) noexcept {
        try {
            host_.release_block(b);
        } catch (...) {
            // a host cache's release cannot fail for a live block (no device, no fences)
        }
    }

    /// Marks the end of the copies queued so far.
    void record_done() {
        if constexpr (on_device) {
            scoped_context current(*context_);
            done_.record(stream_);
        }
    }
    /// The tier's stream waits for the work queued so far on `stream`.
    void stream_waits_for(cudaStream_t stream) {
        if constexpr (!on_device) {
            return;
        }
        scoped_context current(*context_);
        const stream_event e = stream_event::create();
        e.record(stream);
        driver::check(driver::get().stream_wait_event(stream_, e.get(), 0), "cuStreamWaitEvent(host_tier)");
    }

    Prefix& prefix_;
    gpu_cache& gpu_;
    cudaStream_t stream_;
    host_cache_type host_;
    std::optional<primary_context> context_;  // the GPU's, when the cache is on one
    stream_event done_;                        // recorded after each batch of copies
    detail::host_store store_;
    host_tier_stats stats_;
};

} // namespace vmmpp
