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

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/detail/device_copy.hpp"
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

} // namespace detail

/// Copies KV blocks between two caches: every layer's K and V of block `src_blocks[i]` of `src`
/// go to block `dst_blocks[i]` of `dst`, for every i.
///
/// The caches may differ in configuration (backing, growth, quota), device and `max_blocks`, but
/// not in layout (the template argument, any kv_layout) nor in the shape of a block (layers, kv_heads,
/// head_dim, type, block_tokens). Every check happens before any copy, and a refused call copies
/// nothing (vmmpp::invalid_argument, naming what is wrong):
/// - the block shapes differ (every differing field is named);
/// - the lists differ in length (both lengths are named);
/// - an id is not a live (allocated, reference count > 0) block of its cache (the id is named);
/// - a destination block is shared (reference count > 1, after kv_cache::fork): writing it would
///   change every sequence that shares it, which the cache itself never does (append copies on
///   write). The id and its reference count are named;
/// - a destination id is listed twice, or, when `src` and `dst` are one cache, an id is both a
///   source and a destination (the result would depend on the order of the copies).
///
/// How bytes move is chosen from the backings' properties and devices (detail::transfer_copy):
/// std::memcpy between host caches (done when the call returns; `stream` is not used), else
/// asynchronous copies on `stream`: one cudaMemcpyBatchAsync where it can, cudaMemcpyPeerAsync
/// between GPUs, cudaMemcpyAsync otherwise. A block is copied as its layout's contiguous pieces
/// (Layout::copy_shape: each layer's K and V in layer_major, each layer's packed K/V or latent in
/// packed_kv and mla, one piece per block in block_major); runs of consecutive ids in both lists
/// are copied as one piece per run.
///
/// Device copies are asynchronous: the source blocks must stay unwritten, and the destination
/// blocks unread, until `stream` (`nullptr`: the legacy default stream of the caller's current
/// device) has reached them; to free the source sequence before that, free it with
/// `free(seq, stream)` so that its memory waits for the copy. Between two GPUs the copy engines need the pages of
/// both caches; give each vmm cache the other device in `vmm_options::peer_devices` (see
/// can_access_peer) for a direct copy. A CUDA error while issuing the copies throws
/// vmmpp::cuda_error; the destination blocks' contents are then unspecified (neither cache's
/// bookkeeping changes in any case). A cache that sleeps (kv_cache::sleep) is refused with
/// vmmpp::cache_asleep.
template <class SrcConfig, class DstConfig, class Layout>
void copy_blocks(const kv_cache<SrcConfig, Layout>& src, std::span<const std::int32_t> src_blocks,
                 kv_cache<DstConfig, Layout>& dst, std::span<const std::int32_t> dst_blocks,
                 cudaStream_t stream = nullptr) {
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
                                   ": it is shared with another sequence (fork), whose KV the copy would change");
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

    // --- the copies ---
    detail::transfer_copy copy(src.pool().backing(), src.pool().device(), dst.pool().backing(), dst.pool().device(),
                               stream);
    // Piece r of block b starts at address(0, key, b) + r * pitch (Layout::copy_shape). The
    // shapes agree in rows and width; pitches differ when max_blocks does (layer_major).
    const auto src_shape = Layout::copy_shape(src.geometry());
    const auto dst_shape = Layout::copy_shape(dst.geometry());
    // Consecutive blocks' pieces are adjacent when a block's stride is a piece's width.
    const bool runs = Layout::block_stride_bytes(src.geometry()) == src_shape.width &&
                      Layout::block_stride_bytes(dst.geometry()) == dst_shape.width;
    const std::size_t n = src_blocks.size();
    for (std::size_t r = 0; r < src_shape.rows; ++r) {
        for (std::size_t i = 0; i < n;) {
            std::size_t j = i + 1;
            while (runs && j < n && src_blocks[j] == src_blocks[j - 1] + 1 && dst_blocks[j] == dst_blocks[j - 1] + 1) {
                ++j;
            }
            copy(dst.address(0, kv_part::key, dst_blocks[i]) + r * dst_shape.pitch,
                 src.address(0, kv_part::key, src_blocks[i]) + r * src_shape.pitch, (j - i) * src_shape.width);
            i = j;
        }
    }
    copy.finish();
}

} // namespace vmmpp
