// vmmpp/kv/layout.hpp: where block b of layer l's K or V lives in the cache's span. In both
// layouts each layer's K and V read as a strided tensor [blocks, block_tokens, kv_heads, head_dim]
// (the shape paged-attention kernels take); they differ in what one block's memory touches.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vmmpp/kv/geometry.hpp"

namespace vmmpp {

/// Which of a layer's two tensors.
enum class kv_part : std::uint8_t { key = 0, value = 1 };

/// Layer-major: the span is 2*layers regions, one per (layer, K/V), each a contiguous
/// [max_blocks, block_tokens, kv_heads, head_dim] tensor. A block touches 2*layers places; a
/// page holds many blocks of one tensor. What paged-attention kernels expect by default.
struct layer_major {
    /// Bytes of one (layer, K/V) region.
    [[nodiscard]] static constexpr std::size_t region_bytes(const kv_geometry& g) noexcept {
        return g.block_tensor_bytes() * g.max_blocks;
    }
    [[nodiscard]] static constexpr std::size_t span_bytes(const kv_geometry& g) noexcept { return g.total_bytes(); }
    [[nodiscard]] static constexpr std::size_t offset(const kv_geometry& g, std::uint32_t layer, kv_part part,
                                                      std::uint32_t block) noexcept {
        return (2 * std::size_t{layer} + static_cast<std::size_t>(part)) * region_bytes(g) +
               std::size_t{block} * g.block_tensor_bytes();
    }
    /// Stride, in bytes, from one block to the next within a layer's tensor.
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return g.block_tensor_bytes();
    }
    /// Calls f(offset, bytes) for every contiguous piece of block `b`'s memory.
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            f(offset(g, l, kv_part::key, block), g.block_tensor_bytes());
            f(offset(g, l, kv_part::value, block), g.block_tensor_bytes());
        }
    }
    /// A block's pieces as a 2D copy: `rows` pieces of `width` bytes, `pitch` bytes apart.
    struct block_copy_shape {
        std::size_t rows, width, pitch;
    };
    [[nodiscard]] static constexpr block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        return {2 * std::size_t{g.layers}, g.block_tensor_bytes(), region_bytes(g)};
    }
};

/// Block-major: all layers' K and V of a block are adjacent, so a block is one contiguous range
/// (one hold, one commit serves every layer: the finest elasticity). A layer's tensor is still
/// strided: block stride = the whole block's bytes.
struct block_major {
    [[nodiscard]] static constexpr std::size_t span_bytes(const kv_geometry& g) noexcept { return g.total_bytes(); }
    [[nodiscard]] static constexpr std::size_t offset(const kv_geometry& g, std::uint32_t layer, kv_part part,
                                                      std::uint32_t block) noexcept {
        return std::size_t{block} * g.block_bytes() +
               (2 * std::size_t{layer} + static_cast<std::size_t>(part)) * g.block_tensor_bytes();
    }
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return g.block_bytes();
    }
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        f(std::size_t{block} * g.block_bytes(), g.block_bytes());
    }
    using block_copy_shape = layer_major::block_copy_shape;
    [[nodiscard]] static constexpr block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        return {1, g.block_bytes(), g.block_bytes()};
    }
};

} // namespace vmmpp
