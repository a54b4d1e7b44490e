// vmmpp/kv/transfer.hpp: copying KV blocks from one kv_cache to another: between caches of
// different configurations (a GPU cache and its host tier), and between caches on two GPUs
// (cudaMemcpyPeerAsync). Every argument is checked before the first byte moves.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache.hpp"
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

/// Whether `device` may access the memory of backing `b` directly: a vmm backing that maps its
/// pages for that device (vmm_options::peer_devices). Other backings are not asked (false).
template <class B>
[[nodiscard]] bool grants_access(const B& b, int device) noexcept {
    if constexpr (requires { { b.grants_access(device) } -> std::same_as<bool>; }) {
        return b.grants_access(device);
    } else {
        return false;
    }
}

/// Queues the copies to[i] <- from[i] (bytes[i] each) on `stream` as one cudaMemcpyBatchAsync,
/// the sources read in stream order. `stream` must not be the legacy default stream, which the
/// batch API refuses.
inline void copy_batch_async(std::span<void* const> to, std::span<const void* const> from,
                             std::span<const std::size_t> bytes, cudaStream_t stream, const char* who) {
    if (to.empty()) {
        return;
    }
    cudaMemcpyAttributes attributes{};
    attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    std::size_t first_attribute = 0;
#if CUDART_VERSION >= 13000
    driver::check(::cudaMemcpyBatchAsync(to.data(), from.data(), bytes.data(), to.size(), &attributes, &first_attribute,
                                         1, stream),
                  who);
#else  // CUDA 12.8 and 12.9: non-const arrays, and the index of a failed copy (unused: the error names the call)
    std::size_t failed = 0;
    driver::check(::cudaMemcpyBatchAsync(const_cast<void**>(to.data()), const_cast<void**>(from.data()),
                                         const_cast<std::size_t*>(bytes.data()), to.size(), &attributes,
                                         &first_attribute, 1, &failed, stream),
                  who);
#endif
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
/// How bytes move, chosen from the backings' properties and devices:
/// - both caches in host memory only (`host_accessible`, not `device_accessible`): std::memcpy,
///   done when the call returns; `stream` is not used;
/// - both on devices, different ones: cudaMemcpyPeerAsync on `stream`;
/// - otherwise (one device, or host and device memory mixed): cudaMemcpyAsync with
///   cudaMemcpyDefault on `stream`.
/// A block is copied as its layout's contiguous pieces (Layout::copy_shape: each layer's K and V
/// in layer_major, each layer's packed K/V or latent in packed_kv and mla, one piece per block in
/// block_major); runs of consecutive ids in both lists are copied as one piece per run. Not
/// cudaMemcpy2DAsync: VMM pieces lie in different physical allocations, which a 2D copy rejects.
/// Device-to-device pieces go in one cudaMemcpyBatchAsync when `stream` is not the legacy default
/// stream (which the batch API refuses) and, between GPUs, both caches map their pages for the
/// other device: submitting each piece alone cost 3.2 us more per 2 MiB piece between two H100s
/// (docs/NIXL.md), next to the 5.5 us the copy itself takes over NVLink.
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
    using src_backing = typename SrcConfig::backing_type;
    using dst_backing = typename DstConfig::backing_type;
    constexpr bool src_on_device = has_property<src_backing, device_accessible>;
    constexpr bool dst_on_device = has_property<dst_backing, device_accessible>;
    static_assert(src_on_device || has_property<src_backing, host_accessible>,
                  "vmmpp::copy_blocks: the source backing is neither device_accessible nor host_accessible");
    static_assert(dst_on_device || has_property<dst_backing, host_accessible>,
                  "vmmpp::copy_blocks: the destination backing is neither device_accessible nor host_accessible");

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
    const int src_device = src.pool().device();
    const int dst_device = dst.pool().device();
    const bool peer = src_on_device && dst_on_device && src_device >= 0 && dst_device >= 0 && src_device != dst_device;
    std::vector<void*> batch_to;  // the pieces, when they go in one batch
    std::vector<const void*> batch_from;
    std::vector<std::size_t> batch_bytes;
    bool batched = false;
    if constexpr (src_on_device && dst_on_device && !has_property<src_backing, host_accessible> &&
                  !has_property<dst_backing, host_accessible>) {
        batched = stream != nullptr && (!peer || (detail::grants_access(src.pool().backing(), dst_device) &&
                                                  detail::grants_access(dst.pool().backing(), src_device)));
    }
    auto copy = [&](std::byte* to, const std::byte* from, std::size_t bytes) {
        if constexpr (!src_on_device && !dst_on_device) {
            std::memcpy(to, from, bytes);
        } else if (batched) {
            batch_to.push_back(to);
            batch_from.push_back(from);
            batch_bytes.push_back(bytes);
        } else if (peer) {
            driver::check(::cudaMemcpyPeerAsync(to, dst_device, from, src_device, bytes, stream),
                          "cudaMemcpyPeerAsync(copy_blocks)");
        } else {
            driver::check(::cudaMemcpyAsync(to, from, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync(copy_blocks)");
        }
    };

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
    if (batched) {
        detail::copy_batch_async(batch_to, batch_from, batch_bytes, stream, "cudaMemcpyBatchAsync(copy_blocks)");
    }
}

} // namespace vmmpp
