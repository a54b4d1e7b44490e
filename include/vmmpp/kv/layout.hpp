// vmmpp/kv/layout.hpp: KV layout policies, the second template argument of kv_cache: where
// block b of layer l's K or V lives in the cache's span, which contiguous pieces a block's
// memory is made of, and the strides kernels read it with. Every layout models kv_layout.
//
// Every layout describes a layer's K (or V) with one logical shape, [blocks, block_tokens,
// kv_heads, head_dim], and strides (in elements) that say the order in memory, as PyTorch's
// channels_last keeps NCHW: one indexing works for every layout, and permute(0, 2, 1, 3) of an
// HND tensor is the [blocks, heads, tokens, dim] tensor as it lies in memory.
//
//   layout           a block of layer l's K, in memory              pieces per block  used by
//   layer_major      [tokens, heads, dim]; a tensor per (l, K/V)    2 x layers        paged-attention kernels (NHD)
//   layer_major_hnd  [heads, tokens, dim]; a tensor per (l, K/V)    2 x layers        FlashInfer HND, vLLM NIXL
//   block_major      [tokens, heads, dim]; all layers adjacent      1                 (the finest elasticity)
//   block_major_hnd  [heads, tokens, dim]; all layers adjacent      1
//   packed_kv        [heads, tokens, K dim | V dim]; a tensor per l layers            vLLM >= 0.26
//   mla              [tokens, latent]; a latent tensor per l, no V  layers            DeepSeek V2/V3 (FlashMLA)
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/geometry.hpp"

namespace vmmpp {

/// Which of a layer's two tensors (mla layouts have only the key: the latent).
enum class kv_part : std::uint8_t { key = 0, value = 1 };

/// Order of a block's tokens and heads in memory: NHD (tokens, then heads: each token's heads
/// adjacent) or HND (heads, then tokens: each head's tokens adjacent, what FlashInfer's "HND"
/// and vLLM's NIXL connector take).
enum class token_order : std::uint8_t { nhd, hnd };

/// Strides, in elements, of the logical dimensions [block, token, head, dim].
using kv_strides = std::array<std::int64_t, 4>;

/// A block's pieces as a 2D copy: `rows` contiguous pieces of `width` bytes, `pitch` bytes apart,
/// the first at address(0, key, block).
struct kv_block_copy_shape {
    std::size_t rows, width, pitch;
};

namespace detail {

/// A callable of the shape for_each_piece takes, for the concept's check.
struct piece_sink {
    void operator()(std::size_t, std::size_t) const noexcept {}
};

/// Strides of [block, token, head, dim] for a block laid out in `order` whose (token, head) rows
/// hold `row` elements (head_dim, or 2 x head_dim when K and V share a row).
[[nodiscard]] constexpr kv_strides in_block_strides(token_order order, const kv_geometry& g, std::size_t block_bytes,
                                                    std::int64_t row) noexcept {
    const auto block = static_cast<std::int64_t>(block_bytes / size_of(g.type));
    const auto tokens = static_cast<std::int64_t>(g.block_tokens);
    const auto heads = static_cast<std::int64_t>(g.kv_heads);
    if (order == token_order::nhd) {
        return {block, heads * row, row, 1};
    }
    return {block, row, tokens * row, 1};
}

} // namespace detail

/// What kv_cache needs of a layout (all static, all computed from a validated geometry):
/// - `name`, for messages; `parts`: 2 (K and V) or 1 (only K: a latent, mla);
///   `packs_kv`: K and V share each (token, head) row, and kv_cache::packed_tensor exists;
/// - `validate(g)`: throws invalid_argument naming what of a geometry the layout cannot hold;
/// - `span_bytes(g)`: bytes of the whole span; `offset(g, layer, part, block)`: where a block's
///   K or V begins (its element [0, 0, 0]); `strides(g)`: element strides of a layer's K or V as
///   [block, token, head, dim]; `block_stride_bytes(g)`: strides(g)[0] in bytes;
/// - `for_each_piece(g, block, f)`: calls f(offset, bytes) for each contiguous piece of a
///   block's memory, always in the same order, pieces of different blocks disjoint;
/// - `copy_shape(g)`: the same pieces as rows of a 2D copy (see kv_block_copy_shape).
template <class L>
concept kv_layout = requires(const kv_geometry& g, std::uint32_t layer, kv_part part, std::uint32_t block,
                             detail::piece_sink sink) {
    { L::name } -> std::convertible_to<const char*>;
    { L::parts } -> std::convertible_to<unsigned>;
    { L::packs_kv } -> std::convertible_to<bool>;
    L::validate(g);
    { L::span_bytes(g) } -> std::same_as<std::size_t>;
    { L::offset(g, layer, part, block) } -> std::same_as<std::size_t>;
    { L::strides(g) } -> std::same_as<kv_strides>;
    { L::block_stride_bytes(g) } -> std::same_as<std::size_t>;
    { L::copy_shape(g) } -> std::same_as<kv_block_copy_shape>;
    L::for_each_piece(g, block, sink);
};

/// Layer-major: the span is 2 x layers regions, one per (layer, K/V), each a contiguous
/// [max_blocks, block] tensor, a block's tokens and heads in `Order`. A block touches 2 x layers
/// places; a page holds many blocks of one tensor. What paged-attention kernels expect by default.
template <token_order Order>
struct basic_layer_major {
    static constexpr const char* name = Order == token_order::nhd ? "layer_major" : "layer_major_hnd";
    static constexpr unsigned parts = 2;
    static constexpr bool packs_kv = false;
    using block_copy_shape = kv_block_copy_shape;
    /// Every valid geometry fits.
    static constexpr void validate(const kv_geometry&) noexcept {}
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
    /// Block stride = one block tensor.
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return g.block_tensor_bytes();
    }
    [[nodiscard]] static constexpr kv_strides strides(const kv_geometry& g) noexcept {
        return detail::in_block_strides(Order, g, block_stride_bytes(g), g.head_dim);
    }
    /// Calls f(offset, bytes) for every contiguous piece of block `block`'s memory.
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            f(offset(g, l, kv_part::key, block), g.block_tensor_bytes());
            f(offset(g, l, kv_part::value, block), g.block_tensor_bytes());
        }
    }
    [[nodiscard]] static constexpr kv_block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        return {2 * std::size_t{g.layers}, g.block_tensor_bytes(), region_bytes(g)};
    }
};
/// Layer-major, tokens before heads in a block (NHD): [max_blocks, block_tokens, kv_heads, head_dim].
using layer_major = basic_layer_major<token_order::nhd>;
/// Layer-major, heads before tokens in a block (HND): [max_blocks, kv_heads, block_tokens, head_dim].
using layer_major_hnd = basic_layer_major<token_order::hnd>;
static_assert(kv_layout<layer_major>);
static_assert(kv_layout<layer_major_hnd>);

/// Block-major: all layers' K and V of a block are adjacent (layer 0 K, layer 0 V, layer 1 K,
/// ...), so a block is one contiguous range (one hold, one commit serves every layer: the finest
/// elasticity). A layer's tensor is still strided: block stride = the whole block's bytes.
template <token_order Order>
struct basic_block_major {
    static constexpr const char* name = Order == token_order::nhd ? "block_major" : "block_major_hnd";
    static constexpr unsigned parts = 2;
    static constexpr bool packs_kv = false;
    using block_copy_shape = kv_block_copy_shape;
    /// Every valid geometry fits.
    static constexpr void validate(const kv_geometry&) noexcept {}
    [[nodiscard]] static constexpr std::size_t span_bytes(const kv_geometry& g) noexcept { return g.total_bytes(); }
    [[nodiscard]] static constexpr std::size_t offset(const kv_geometry& g, std::uint32_t layer, kv_part part,
                                                      std::uint32_t block) noexcept {
        return std::size_t{block} * g.block_bytes() +
               (2 * std::size_t{layer} + static_cast<std::size_t>(part)) * g.block_tensor_bytes();
    }
    /// Block stride = the whole block (every layer's K and V).
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return g.block_bytes();
    }
    [[nodiscard]] static constexpr kv_strides strides(const kv_geometry& g) noexcept {
        return detail::in_block_strides(Order, g, block_stride_bytes(g), g.head_dim);
    }
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        f(std::size_t{block} * g.block_bytes(), g.block_bytes());
    }
    [[nodiscard]] static constexpr kv_block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        return {1, g.block_bytes(), g.block_bytes()};
    }
};
/// Block-major, NHD inside each block tensor.
using block_major = basic_block_major<token_order::nhd>;
/// Block-major, HND inside each block tensor.
using block_major_hnd = basic_block_major<token_order::hnd>;
static_assert(kv_layout<block_major>);
static_assert(kv_layout<block_major_hnd>);

/// Packed K/V (vLLM >= 0.26): one contiguous tensor per layer, [max_blocks, block], where a
/// block's (token, head) rows hold 2 x head_dim elements, K's head_dim then V's. In `Order`
/// (packed_kv: HND) that is the per-layer tensor [max_blocks, kv_heads, block_tokens,
/// 2 x head_dim]. kv_cache::tensor(layer, key/value) are strided views into it (V starts
/// head_dim elements after K); kv_cache::packed_tensor(layer) is the whole per-layer tensor.
/// A block touches `layers` places, each 2 x block_tensor_bytes.
template <token_order Order>
struct basic_packed_kv {
    static constexpr const char* name = Order == token_order::hnd ? "packed_kv" : "packed_kv_nhd";
    static constexpr unsigned parts = 2;
    static constexpr bool packs_kv = true;
    using block_copy_shape = kv_block_copy_shape;
    /// Every valid geometry fits.
    static constexpr void validate(const kv_geometry&) noexcept {}
    /// Bytes of one block of one layer, K and V.
    [[nodiscard]] static constexpr std::size_t layer_block_bytes(const kv_geometry& g) noexcept {
        return 2 * g.block_tensor_bytes();
    }
    /// Bytes of one layer's tensor.
    [[nodiscard]] static constexpr std::size_t region_bytes(const kv_geometry& g) noexcept {
        return layer_block_bytes(g) * g.max_blocks;
    }
    [[nodiscard]] static constexpr std::size_t span_bytes(const kv_geometry& g) noexcept { return g.total_bytes(); }
    [[nodiscard]] static constexpr std::size_t offset(const kv_geometry& g, std::uint32_t layer, kv_part part,
                                                      std::uint32_t block) noexcept {
        return std::size_t{layer} * region_bytes(g) + std::size_t{block} * layer_block_bytes(g) +
               static_cast<std::size_t>(part) * g.head_dim * size_of(g.type);
    }
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return layer_block_bytes(g);
    }
    /// Strides of K, V and the packed tensor alike (a row is 2 x head_dim elements).
    [[nodiscard]] static constexpr kv_strides strides(const kv_geometry& g) noexcept {
        return detail::in_block_strides(Order, g, block_stride_bytes(g), 2 * std::int64_t{g.head_dim});
    }
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            f(offset(g, l, kv_part::key, block), layer_block_bytes(g));
        }
    }
    [[nodiscard]] static constexpr kv_block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        return {std::size_t{g.layers}, layer_block_bytes(g), region_bytes(g)};
    }
};
/// Packed K/V as vLLM >= 0.26 keeps it: per layer [max_blocks, kv_heads, block_tokens, 2 x head_dim].
using packed_kv = basic_packed_kv<token_order::hnd>;
static_assert(kv_layout<packed_kv>);

/// MLA (DeepSeek V2/V3): one latent tensor per layer and no V. The geometry's head_dim is the
/// latent's size (kv_lora_rank + rope dim, 576 for DeepSeek V3) and kv_heads must be 1; each
/// layer is a contiguous [max_blocks, block_tokens, 1, head_dim] tensor: what FlashMLA takes as
/// k_cache (num_blocks, page_block_size, num_heads_k = 1, head_dim); vLLM's MLA backends take
/// its squeeze(2), [max_blocks, block_tokens, head_dim]. kv_part::value is refused
/// (invalid_argument). A block touches `layers` places, each block_tokens x head_dim elements.
struct mla {
    static constexpr const char* name = "mla";
    static constexpr unsigned parts = 1;
    static constexpr bool packs_kv = false;
    using block_copy_shape = kv_block_copy_shape;
    /// Throws invalid_argument unless kv_heads is 1 (one latent vector per token).
    static void validate(const kv_geometry& g) {
        if (g.kv_heads != 1) {
            throw invalid_argument("kv_geometry.kv_heads is " + std::to_string(g.kv_heads) +
                                   ": the mla layout keeps one latent vector per token, so kv_heads must be 1 "
                                   "(head_dim is the latent size, e.g. 576)");
        }
    }
    /// Bytes of one layer's latent tensor.
    [[nodiscard]] static constexpr std::size_t region_bytes(const kv_geometry& g) noexcept {
        return g.block_tensor_bytes() * g.max_blocks;
    }
    [[nodiscard]] static constexpr std::size_t span_bytes(const kv_geometry& g) noexcept {
        return region_bytes(g) * g.layers;
    }
    /// Where block `block` of layer `layer`'s latent begins (`part` must be key: kv_cache checks).
    [[nodiscard]] static constexpr std::size_t offset(const kv_geometry& g, std::uint32_t layer, kv_part /*key*/,
                                                      std::uint32_t block) noexcept {
        return std::size_t{layer} * region_bytes(g) + std::size_t{block} * g.block_tensor_bytes();
    }
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return g.block_tensor_bytes();
    }
    [[nodiscard]] static constexpr kv_strides strides(const kv_geometry& g) noexcept {
        return detail::in_block_strides(token_order::nhd, g, block_stride_bytes(g), g.head_dim);
    }
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            f(offset(g, l, kv_part::key, block), g.block_tensor_bytes());
        }
    }
    [[nodiscard]] static constexpr kv_block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        return {std::size_t{g.layers}, g.block_tensor_bytes(), region_bytes(g)};
    }
};
static_assert(kv_layout<mla>);

} // namespace vmmpp
