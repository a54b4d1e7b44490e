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
//   sequence_contiguous  layer_major's memory; each sequence owns a slot of consecutive block ids,
//                    so its K (V) of a layer is one [tokens, heads, dim] run      2 x layers   non-paged kernels (vAttention)
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/block_allocator.hpp"
#include "vmmpp/kv/block_ids.hpp"
#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/kv/sequence_slots.hpp"
#include "vmmpp/kv/tensor.hpp"

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
/// hold `row_elements` elements (a head's row, or two when K and V share a row).
[[nodiscard]] constexpr kv_strides in_block_strides(token_order order, const kv_geometry& g, std::size_t block_bytes,
                                                    std::size_t row_elements) noexcept {
    const auto row = static_cast<std::int64_t>(row_elements);
    const auto block = static_cast<std::int64_t>(block_bytes / size_of(g.type));
    const auto tokens = static_cast<std::int64_t>(g.block_tokens);
    const auto heads = static_cast<std::int64_t>(g.kv_heads);
    if (order == token_order::nhd) {
        return {block, heads * row, row, 1};
    }
    return {block, row, tokens * row, 1};
}

/// Throws invalid_argument for a geometry with scales, which layout `layout` does not keep.
inline void refuse_scales(const kv_geometry& g, const char* layout) {
    if (g.scales.group != 0) {
        throw invalid_argument(std::string("kv_geometry.scales: the ") + layout +
                               " layout keeps no scales in its blocks (layer_major, block_major, their _hnd forms "
                               "and mla do)");
    }
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
/// - `copy_shape(g)`: the same pieces as rows of a 2D copy (see kv_block_copy_shape);
/// - optionally `block_ids`: how block ids are handed out, a kv_block_ids policy
///   (vmmpp/kv/block_ids.hpp; block_allocator if none is named, see block_ids_of).
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
    using block_ids = block_allocator;  ///< lowest free id, forks share blocks
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
        return detail::in_block_strides(Order, g, block_stride_bytes(g), g.row_elements());
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
    using block_ids = block_allocator;  ///< lowest free id, forks share blocks
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
        return detail::in_block_strides(Order, g, block_stride_bytes(g), g.row_elements());
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
    using block_ids = block_allocator;  ///< lowest free id, forks share blocks
    using block_copy_shape = kv_block_copy_shape;
    /// Throws invalid_argument for scales (kv_geometry::scales): K and V share rows here, and
    /// where their scales would go is not settled.
    static void validate(const kv_geometry& g) { detail::refuse_scales(g, name); }
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
               static_cast<std::size_t>(part) * g.row_elements() * size_of(g.type);
    }
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return layer_block_bytes(g);
    }
    /// Strides of K, V and the packed tensor alike (a row is 2 x head_dim elements).
    [[nodiscard]] static constexpr kv_strides strides(const kv_geometry& g) noexcept {
        return detail::in_block_strides(Order, g, block_stride_bytes(g), 2 * g.row_elements());
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
    using block_ids = block_allocator;  ///< lowest free id, forks share blocks
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
        return detail::in_block_strides(token_order::nhd, g, block_stride_bytes(g), g.row_elements());
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

/// Sequence-contiguous (vAttention style): layer_major's memory (a [max_blocks, block_tokens,
/// kv_heads, head_dim] NHD tensor per layer and K/V), with block ids handed out by sequence
/// slot. The geometry's max_tokens_per_sequence, rounded up to whole blocks, is a slot of
/// slot_blocks(g) consecutive ids; sequence s (in slot k) gets ids k * slot_blocks(g) + 0, 1, ...
/// in token order. Consecutive NHD blocks of one region are adjacent in memory with block stride
/// block_tokens x token stride, so a sequence's K (or V) of a layer is one contiguous
/// [tokens, kv_heads, head_dim] tensor (kv_cache::sequence_tensor) that a standard non-paged
/// attention kernel reads as it is, while paged kernels still read it through block tables.
/// Memory follows the tokens: a slot is address space only, and pages are committed as the
/// sequence grows and given back when it shrinks (truncate) or ends (free).
///
/// Why a layout and not a cache option: it decides what block ids mean and what kernels read
/// (a dense per-sequence view), and refuses fork (below); a type makes that visible where the
/// cache is declared and in every test over layouts. Why over layer_major NHD only: it is the
/// one memory order whose token stride is uniform across block boundaries of a region (HND and
/// block_major interleave other heads or layers between a sequence's blocks; packed K|V would
/// give a strided, not dense, view).
///
/// Fork is refused (invalid_argument saying why): a block id names a position in one slot, so
/// two sequences cannot share blocks, and an eager copy of every layer would hide a large device
/// copy behind a call that is O(1) in the paged layouts. Copy by appending to a new sequence.
struct sequence_contiguous : basic_layer_major<token_order::nhd> {
    static constexpr const char* name = "sequence_contiguous";
    /// Block ids by sequence slot (vmmpp/kv/sequence_slots.hpp).
    using block_ids = slot_block_allocator;
    /// Blocks of one slot: max_tokens_per_sequence rounded up to whole blocks.
    [[nodiscard]] static constexpr std::uint32_t slot_blocks(const kv_geometry& g) noexcept {
        return slot_block_allocator::slot_blocks_for(g);
    }
    /// Sequences the cache can hold at once: max_blocks / slot_blocks.
    [[nodiscard]] static constexpr std::uint32_t slot_count(const kv_geometry& g) noexcept {
        return g.max_blocks / slot_blocks(g);
    }
    /// Element strides of a sequence's [tokens, kv_heads, head_dim] run.
    [[nodiscard]] static constexpr std::array<std::int64_t, 3> sequence_strides(const kv_geometry& g) noexcept {
        const kv_strides s = strides(g);
        return {s[1], s[2], s[3]};
    }
    /// Throws invalid_argument unless max_tokens_per_sequence is set and at least one slot fits,
    /// or for scales (they would break a sequence's run of data between its blocks).
    static void validate(const kv_geometry& g) {
        detail::refuse_scales(g, name);
        if (g.max_tokens_per_sequence == 0) {
            throw invalid_argument("kv_geometry.max_tokens_per_sequence is 0: the sequence_contiguous layout "
                                   "reserves that many tokens of address space per sequence, so it must be set");
        }
        const std::size_t slot = g.blocks_for(g.max_tokens_per_sequence);
        if (slot > g.max_blocks) {
            throw invalid_argument("kv_geometry.max_tokens_per_sequence " + std::to_string(g.max_tokens_per_sequence) +
                                   " needs " + std::to_string(slot) + " blocks of " + std::to_string(g.block_tokens) +
                                   " tokens per sequence: more than max_blocks " + std::to_string(g.max_blocks));
        }
    }
};
static_assert(kv_layout<sequence_contiguous>);

namespace detail {
template <class L>
struct block_ids_of {
    using type = block_allocator;
};
template <class L>
    requires requires { typename L::block_ids; }
struct block_ids_of<L> {
    using type = typename L::block_ids;
};
} // namespace detail

/// The block-id policy of layout `L` (a kv_block_ids): `L::block_ids`, or block_allocator for a
/// layout that names none.
template <class L>
using block_ids_of = typename detail::block_ids_of<L>::type;

/// A layout whose block ids kv_cache hands out by sequence slot: each sequence's blocks are
/// consecutive ids of its own slot (see sequence_contiguous).
template <class L>
concept sequence_slot_layout = kv_layout<L> && requires(const kv_geometry& g) {
    requires std::same_as<block_ids_of<L>, slot_block_allocator>;
    { L::slot_blocks(g) } -> std::same_as<std::uint32_t>;
    { L::slot_count(g) } -> std::same_as<std::uint32_t>;
    { L::sequence_strides(g) } -> std::same_as<std::array<std::int64_t, 3>>;
};
static_assert(sequence_slot_layout<sequence_contiguous>);
static_assert(!sequence_slot_layout<layer_major> && !sequence_slot_layout<mla>);

namespace detail {

/// `g` checked by kv_geometry::validate and the layout's validate (invalid_argument naming what
/// does not fit).
template <class L>
const kv_geometry& validated(const kv_geometry& g) {
    g.validate();
    L::validate(g);
    return g;
}
/// Throws invalid_argument unless (layer, part, block) lies in layout `L`'s cache over `g`.
template <class L>
void check_address(const kv_geometry& g, std::uint32_t layer, kv_part part, std::int32_t block) {
    if (static_cast<unsigned>(part) >= L::parts) {
        throw invalid_argument("KV address of part " + std::to_string(static_cast<unsigned>(part)) + " of layer " +
                               std::to_string(layer) + ": the " + L::name + " layout has " + std::to_string(L::parts) +
                               (L::parts == 1 ? " part (the key: a latent, no value)" : " parts (key, value)"));
    }
    if (layer >= g.layers || block < 0 || static_cast<std::uint32_t>(block) >= g.max_blocks) {
        throw invalid_argument("KV address of layer " + std::to_string(layer) + ", block " + std::to_string(block) +
                               " outside " + std::to_string(g.layers) + " layers x " + std::to_string(g.max_blocks) +
                               " blocks");
    }
}
/// Layout `L`'s tensor of one layer's K or V from `data` (its block 0) whose last dimension holds
/// `last` elements (kv_cache::tensor, packed_tensor).
template <class L>
kv_tensor layer_tensor(const kv_geometry& g, void* data, int device, std::int64_t last) {
    return {data, g.type, device,
            {static_cast<std::int64_t>(g.max_blocks), static_cast<std::int64_t>(g.block_tokens),
             static_cast<std::int64_t>(g.kv_heads), last},
            L::strides(g)};
}
/// Layout `L`'s scales of one layer's K or V (kv_geometry::scales) from `data`, the scales of
/// block 0: [max_blocks, block_tokens, kv_heads, row_scales] in the order of the data (the
/// strides of `L`'s data say which), in elements of the scales' type (kv_cache::scale_tensor).
template <class L>
kv_tensor scale_tensor(const kv_geometry& g, void* data, int device) {
    const kv_strides d = L::strides(g);
    const bool tokens_first = d[1] >= d[2];  // NHD (equal only where one of them is 1: the same)
    const auto groups = static_cast<std::int64_t>(g.row_scales());
    const auto tokens = static_cast<std::int64_t>(g.block_tokens);
    const auto heads = static_cast<std::int64_t>(g.kv_heads);
    const auto block = static_cast<std::int64_t>(L::block_stride_bytes(g) / size_of(g.scales.type));
    // (Not a conditional between two braced kv_strides: nvcc 13.0's cicc crashes on that.)
    kv_tensor t{data, g.scales.type, device, {static_cast<std::int64_t>(g.max_blocks), tokens, heads, groups}, {}};
    t.strides = {block, tokens_first ? heads * groups : groups, tokens_first ? groups : tokens * groups, 1};
    return t;
}
/// A sequence-slot layout's [1, tokens, kv_heads, head_dim] run of one sequence from `data` (its
/// first block), the leading stride one slot of `slot_blocks` blocks (kv_cache::sequence_tensor).
template <class L>
kv_tensor sequence_tensor(const kv_geometry& g, void* data, int device, std::size_t tokens, std::uint32_t slot_blocks) {
    const auto s = L::sequence_strides(g);
    return {data, g.type, device,
            {1, static_cast<std::int64_t>(tokens), static_cast<std::int64_t>(g.kv_heads),
             static_cast<std::int64_t>(g.row_elements())},
            {s[0] * static_cast<std::int64_t>(slot_blocks) * g.block_tokens, s[0], s[1], s[2]}};
}
/// The bytes of layout `L`'s span over `g`, rounded up to a multiple of `alignment`.
template <class L>
std::size_t span_bytes(const kv_geometry& g, std::size_t alignment) {
    if (alignment == 0) {
        throw invalid_argument("kv_cache_options.span_alignment must not be zero");
    }
    const std::size_t bytes = L::span_bytes(g);
    if (bytes > std::numeric_limits<std::size_t>::max() - alignment) {
        throw invalid_argument("kv_geometry: the span overflows size_t when aligned");
    }
    return (bytes + alignment - 1) / alignment * alignment;
}
} // namespace detail


} // namespace vmmpp
