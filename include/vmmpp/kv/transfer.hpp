// vmmpp/kv/transfer.hpp: copying KV blocks from one kv_cache to another: between caches of
// different configurations (a GPU cache and its host tier), and between caches on two GPUs
// (cudaMemcpyPeerAsync). Every argument is checked before the first byte moves.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/kv/blocks_contiguous.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/detail/device_copy.hpp"
#include "vmmpp/kv/detail/staged_copy.hpp"
#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/kv/layout.hpp"

namespace vmmpp {

namespace detail {

/// The name of an element type, for messages.
[[nodiscard]] constexpr const char* dtype_name(dtype t) noexcept {
    switch (t) {
    case dtype::f32: return "f32";
    case dtype::f16: return "f16";
    case dtype::bf16: return "bf16";
    case dtype::fp8_e4m3: return "fp8_e4m3";
    case dtype::fp8_e5m2: return "fp8_e5m2";
    case dtype::fp4_e2m1x2: return "fp4_e2m1x2";
    }
    return "unknown";
}

/// Throws invalid_argument naming every field in which two geometries differ, max_blocks aside
/// (a block has the same shape in caches of different sizes).
inline void check_same_block_shape(const kv_geometry& src, const kv_geometry& dst) {
    std::string diff;
    auto field = [&](const char* name, const std::string& s, const std::string& d) {
        if (s != d) {
            diff += (diff.empty() ? "" : ", ") + std::string(name) + " " + s + " (source) vs " + d + " (destination)";
        }
    };
    field("layers", std::to_string(src.layers), std::to_string(dst.layers));
    field("kv_heads", std::to_string(src.kv_heads), std::to_string(dst.kv_heads));
    field("head_dim", std::to_string(src.head_dim), std::to_string(dst.head_dim));
    field("type", dtype_name(src.type), dtype_name(dst.type));
    field("block_tokens", std::to_string(src.block_tokens), std::to_string(dst.block_tokens));
    if (!diff.empty()) {
        throw invalid_argument("copy_blocks: the caches' geometries differ: " + diff);
    }
}

/// Throws invalid_argument unless every id of `blocks` is a live block of `cache`.
template <class Cache>
void check_live_blocks(const Cache& cache, std::span<const std::int32_t> blocks, const char* which) {
    const std::size_t max_blocks = cache.geometry().max_blocks;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
        const std::int32_t b = blocks[i];
        if (b < 0 || static_cast<std::size_t>(b) >= max_blocks) {
            throw invalid_argument("copy_blocks: " + std::string(which) + " block " + std::to_string(b) + " (entry " +
                                   std::to_string(i) + ") is outside the " + which + " cache's " +
                                   std::to_string(max_blocks) + " blocks");
        }
        if (cache.block_refs(b) == 0) {
            throw invalid_argument("copy_blocks: " + std::string(which) + " block " + std::to_string(b) + " (entry " +
                                   std::to_string(i) + ") is free in the " + which +
                                   " cache: only live (allocated) blocks can be copied");
        }
    }
}

/// copy_blocks' stream order (kv_cache's class comment): before the copies, `stream` waits for
/// the readers queued before the destination blocks' last free (their ids may have been handed
/// out again since); after them, one fence per device-visible cache (one in all when `src` and
/// `dst` are one cache) goes on every source and destination block, so that whoever lets go of
/// one last, on whatever stream, waits for the copy. Host caches copy at once: no fences.
/// Between two GPUs, a cache not on `stream`'s device waits and records on its own stream
/// (kv_cache_options::stream), ordered with `stream` (stream_devices). The fake driver of the
/// tests has one device: that path runs on two GPUs only.
template <class Src, class Dst>
class copy_order {
    static constexpr bool src_ordered = has_property<typename Src::backing_type, device_accessible>;
    static constexpr bool dst_ordered = has_property<typename Dst::backing_type, device_accessible>;
    using side = stream_devices::side;

public:
    /// Throws: cuda_error (`stream`'s context, between two GPUs): nothing changed.
    copy_order(Src& src, std::span<const std::int32_t> src_blocks, Dst& dst, std::span<const std::int32_t> dst_blocks,
               cudaStream_t stream)
        : src_(src), dst_(dst), src_blocks_(src_blocks), dst_blocks_(dst_blocks), stream_(stream),
          one_cache_(static_cast<const void*>(&src) == static_cast<const void*>(&dst)),
          devices_(stream, src_ordered ? src.pool().device() : -1, dst_ordered ? dst.pool().device() : -1) {}

    /// Before the copies. Throws: cuda_error, std::bad_alloc: nothing changed but waits queued.
    void before() {
        if constexpr (src_ordered) {
            src_.order_outside_read(src_blocks_);
        }
        if constexpr (dst_ordered) {
            if (!devices_.elsewhere(side::destination)) {
                dst_.order_outside_write(dst_blocks_, stream_);
            } else {  // the destination's own stream waits for the readers, and `stream` for it
                dst_.order_outside_write(dst_blocks_, dst_.stream());
                devices_.stream_waits_for(side::destination, dst_.stream());
            }
        }
    }

    /// After a copy failed: the copies queued before it get their fences all the same (on a lost
    /// context none can be recorded, and nothing queued runs any more).
    void after_failed_copy() noexcept {
        try {
            after();
        } catch (...) {
        }
    }

    /// After the copies are queued. Throws: cuda_error recording a fence (a lost context): the
    /// fence recorded before it is on its blocks, the failed cache's blocks get none.
    void after() {
        if constexpr (dst_ordered) {
            const pool_fence f = fence(dst_, side::destination);
            dst_.fence_blocks(dst_blocks_, f);
            if (one_cache_) {
                dst_.fence_blocks(src_blocks_, f);
                return;
            }
        }
        if constexpr (src_ordered) {
            src_.fence_blocks(src_blocks_, fence(src_, side::source));
        }
    }

private:
    /// A fence of `cache`'s pool after the copies: on `stream`, or on the cache's own stream
    /// once that waits for `stream`.
    template <class Cache>
    pool_fence fence(Cache& cache, side s) {
        if (!devices_.elsewhere(s)) {
            return cache.pool().record_fence(stream_);
        }
        devices_.waits_for_stream(s, cache.stream());
        return cache.pool().record_fence(cache.stream());
    }

    Src& src_;
    Dst& dst_;
    std::span<const std::int32_t> src_blocks_;
    std::span<const std::int32_t> dst_blocks_;
    cudaStream_t stream_;
    bool one_cache_;
    stream_devices devices_;
};

/// Whether copy_blocks from `src` to `dst` on `stream` goes through a staging buffer
/// (detail/staged_copy.hpp): between a cache in device memory only whose blocks are small
/// pieces and one in page-locked memory whose blocks each lie in one range (blocks_contiguous,
/// or a layout with one piece per block), on a stream other than the legacy default stream.
template <class Src, class Dst>
[[nodiscard]] bool staged_transfer(const Src& src, const Dst& dst, cudaStream_t stream) {
    using src_backing = typename Src::backing_type;
    using dst_backing = typename Dst::backing_type;
    constexpr bool src_gpu = has_property<src_backing, device_accessible> && !has_property<src_backing, host_accessible>;
    constexpr bool dst_gpu = has_property<dst_backing, device_accessible> && !has_property<dst_backing, host_accessible>;
    if constexpr ((src_gpu && has_property<dst_backing, page_locked>) ||
                  (dst_gpu && has_property<src_backing, page_locked>)) {
        const auto& gpu = [&]() -> const auto& {
            if constexpr (src_gpu) { return src; } else { return dst; }
        }();
        const auto& host = [&]() -> const auto& {
            if constexpr (src_gpu) { return dst; } else { return src; }
        }();
        using gpu_layout = typename std::remove_cvref_t<decltype(gpu)>::layout_type;
        using host_layout = typename std::remove_cvref_t<decltype(host)>::layout_type;
        const auto g = gpu_layout::copy_shape(gpu.geometry());
        const auto h = host_layout::copy_shape(host.geometry());
        return stream != nullptr && h.pitch == h.width && worth_staging(g.rows, g.width, g.pitch);
    } else {
        return false;
    }
}

} // namespace detail

/// Copies KV blocks between two caches: every layer's K and V of block `src_blocks[i]` of `src`
/// go to block `dst_blocks[i]` of `dst`, for every i.
///
/// The caches may differ in configuration (backing, growth, quota), device and `max_blocks`, but
/// not in layout (the template argument, any kv_layout; or one of them blocks_contiguous over the
/// other's, whose blocks are the same pieces kept together) nor in the shape of a block (layers,
/// kv_heads, head_dim, type, block_tokens). Every check happens before any copy, and a refused call copies
/// nothing (vmmpp::invalid_argument, naming what is wrong):
/// - the block shapes differ (every differing field is named);
/// - the lists differ in length (both lengths are named);
/// - an id is not a live (allocated, reference count > 0) block of its cache (the id is named);
/// - a destination block is shared (reference count > 1, after kv_cache::fork, or a block a
///   prefix cache keeps): writing it would change every sequence that shares it, and a cached
///   block's bytes must stay its tokens', which the cache itself never breaks (append copies on
///   write). The id and its reference count are named;
/// - a destination id is listed twice, or, when `src` and `dst` are one cache, an id is both a
///   source and a destination (the result would depend on the order of the copies).
///
/// How bytes move is chosen from the backings' properties and devices (detail::transfer_copy):
/// std::memcpy between host caches (done when the call returns; `stream` is not used), else
/// asynchronous copies on `stream`: one cudaMemcpyBatchAsync where it can, cudaMemcpyPeerAsync
/// between GPUs, cudaMemcpyAsync otherwise. Between a GPU cache of small pieces (layer_major)
/// and page-locked blocks_contiguous memory (the host tier's), a kernel gathers the pieces into
/// a stream-ordered staging buffer of at most 32 MiB (or scatters them from it), and one DMA per
/// run of host blocks moves them: on an H100, 0.86-0.96x of the pinned copy floor where copies
/// of 32 KiB pieces reach 0.45-0.64x (detail/staged_copy.hpp, docs/HOST_TIER.md). A block is copied as its layout's contiguous pieces
/// (Layout::copy_shape: each layer's K and V in layer_major, each layer's packed K/V or latent in
/// packed_kv and mla, one piece per block in block_major); runs of consecutive ids in both lists
/// are copied as one piece per run.
///
/// Device copies are asynchronous, on `stream` (`nullptr`: the legacy default stream of the
/// caller's current device; a stream of one of the caches' devices), and follow the caches'
/// stream order (kv_cache's class comment): `stream` first waits for the reads queued before a
/// destination block's last free, and every source and destination block gets a fence after the
/// copies, so the sequences may be freed or truncated at once, on any stream: their memory goes
/// back, and a block is written again, only after the copy. The source blocks must still stay
/// unwritten, and the destination blocks unread, by other work until `stream` has reached them.
/// Between two GPUs, a cache not on `stream`'s device records its fence on its own stream
/// (kv_cache_options::stream), which then waits for the copies (detail::copy_order); the copy
/// engines need the pages of both caches: give each vmm cache the other device in
/// `vmm_options::peer_devices` (see can_access_peer) for a direct copy. A CUDA error while
/// issuing the copies or ordering them throws vmmpp::cuda_error; the destination blocks' contents
/// are then unspecified, and a block may carry an extra fence (which only delays it); neither
/// cache's sequences or blocks change in any case. A cache that sleeps (kv_cache::sleep) is
/// refused with vmmpp::cache_asleep. Both caches change (their blocks' fences): like any
/// non-const call, no other call on either may run meanwhile.
template <class SrcConfig, class SrcLayout, class DstConfig, class DstLayout>
void copy_blocks(kv_cache<SrcConfig, SrcLayout>& src, std::span<const std::int32_t> src_blocks,
                 kv_cache<DstConfig, DstLayout>& dst, std::span<const std::int32_t> dst_blocks,
                 cudaStream_t stream = nullptr) {
    static_assert(copyable_layouts<SrcLayout, DstLayout>,
                  "vmmpp::copy_blocks: the caches' layouts differ (one may be blocks_contiguous over the other)");
    // --- every check first: nothing is copied unless all pass ---
    if (src.asleep() || dst.asleep()) {  // its blocks have no memory until wake()
        throw cache_asleep(src.asleep() ? "copy_blocks (source)" : "copy_blocks (destination)");
    }
    detail::check_same_block_shape(src.geometry(), dst.geometry());
    if (src_blocks.size() != dst_blocks.size()) {
        throw invalid_argument("copy_blocks: " + std::to_string(src_blocks.size()) + " source blocks but " +
                               std::to_string(dst_blocks.size()) + " destination blocks");
    }
    detail::check_live_blocks(src, src_blocks, "source");
    detail::check_live_blocks(dst, dst_blocks, "destination");
    for (std::size_t i = 0; i < dst_blocks.size(); ++i) {
        if (const auto refs = dst.block_refs(dst_blocks[i]); refs > 1) {
            throw invalid_argument("copy_blocks: destination block " + std::to_string(dst_blocks[i]) + " (entry " +
                                   std::to_string(i) + ") has reference count " + std::to_string(refs) +
                                   ": it is shared with another sequence (fork) or kept by another holder (a prefix "
                                   "cache's cached block), whose KV the copy would change");
        }
    }
    std::vector<std::int32_t> sorted(dst_blocks.begin(), dst_blocks.end());
    std::sort(sorted.begin(), sorted.end());
    if (auto twice = std::adjacent_find(sorted.begin(), sorted.end()); twice != sorted.end()) {
        throw invalid_argument("copy_blocks: destination block " + std::to_string(*twice) + " is listed twice");
    }
    if (static_cast<const void*>(&src) == static_cast<const void*>(&dst)) {
        for (std::int32_t b : src_blocks) {
            if (std::binary_search(sorted.begin(), sorted.end(), b)) {
                throw invalid_argument("copy_blocks: block " + std::to_string(b) +
                                       " is both a source and a destination in the same cache");
            }
        }
    }
    if (src_blocks.empty()) {
        return;
    }

    // --- the copies, in the caches' stream order ---
    detail::copy_order order(src, src_blocks, dst, dst_blocks, stream);
    order.before();
    // Piece r of block b starts at address(0, key, b) + r * pitch (copy_shape). The shapes agree
    // in rows and width; pitches differ when max_blocks or the layouts do.
    const auto src_shape = SrcLayout::copy_shape(src.geometry());
    const auto dst_shape = DstLayout::copy_shape(dst.geometry());
    const std::size_t n = src_blocks.size();
    try {
        bool staged = false;
        if (detail::staged_transfer(src, dst, stream)) {
            constexpr bool to_host = has_property<typename kv_cache<DstConfig, DstLayout>::backing_type, page_locked>;
            std::vector<std::byte*> gpu(n), host(n);
            for (std::size_t i = 0; i < n; ++i) {
                gpu[i] = to_host ? src.address(0, kv_part::key, src_blocks[i]) : dst.address(0, kv_part::key, dst_blocks[i]);
                host[i] = to_host ? dst.address(0, kv_part::key, dst_blocks[i]) : src.address(0, kv_part::key, src_blocks[i]);
            }
            const auto& g = to_host ? src_shape : dst_shape;
            staged = detail::staged_copy(to_host ? src.pool().device() : dst.pool().device(), stream, g.rows, g.width,
                                         g.pitch, gpu, host, to_host);
        }
        if (!staged) {
            detail::transfer_copy copy(src.pool().backing(), src.pool().device(), dst.pool().backing(),
                                       dst.pool().device(), stream);
            // Consecutive blocks' pieces are adjacent when a block's stride is a piece's width.
            const bool runs = SrcLayout::block_stride_bytes(src.geometry()) == src_shape.width &&
                              DstLayout::block_stride_bytes(dst.geometry()) == dst_shape.width;
            for (std::size_t r = 0; r < src_shape.rows; ++r) {
                for (std::size_t i = 0; i < n;) {
                    std::size_t j = i + 1;
                    while (runs && j < n && src_blocks[j] == src_blocks[j - 1] + 1 &&
                           dst_blocks[j] == dst_blocks[j - 1] + 1) {
                        ++j;
                    }
                    copy(dst.address(0, kv_part::key, dst_blocks[i]) + r * dst_shape.pitch,
                         src.address(0, kv_part::key, src_blocks[i]) + r * src_shape.pitch, (j - i) * src_shape.width);
                    i = j;
                }
            }
            copy.finish();
        }
    } catch (...) {
        order.after_failed_copy();  // pieces before the failed one may be queued
        throw;
    }
    order.after();
}

} // namespace vmmpp
