// vmmpp/kv/geometry.hpp: the shape of a KV cache: layers, heads, head size, element type, tokens
// per block, the most blocks it may ever hold, and for quantized KV the scales each block keeps
// beside its data. Validated once, so every size computed from it later is known not to overflow.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "vmmpp/error.hpp"

namespace vmmpp {

/// Element type of K and V (and of scales), with DLPack-compatible codes. fp4_e2m1x2 is NVFP4's
/// data: two E2M1 values a byte (PyTorch's float4_e2m1fn_x2), so one element holds two values of
/// a head's row.
enum class dtype : std::uint8_t { f32, f16, bf16, fp8_e4m3, fp8_e5m2, fp4_e2m1x2 };

/// Bytes per element.
[[nodiscard]] constexpr std::size_t size_of(dtype t) noexcept {
    switch (t) {
    case dtype::f32: return 4;
    case dtype::f16:
    case dtype::bf16: return 2;
    case dtype::fp8_e4m3:
    case dtype::fp8_e5m2:
    case dtype::fp4_e2m1x2: return 1;
    }
    return 0;
}

/// Values of a head's row one element holds: 2 for fp4_e2m1x2, 1 otherwise.
[[nodiscard]] constexpr std::size_t values_per_element(dtype t) noexcept { return t == dtype::fp4_e2m1x2 ? 2 : 1; }

/// Scales a quantized KV cache keeps in each block beside the data: one scale of `type` per
/// `group` values of a head's row, for every token and head (per-token-head scales: group =
/// head_dim; NVFP4: group 16 of type fp8_e4m3; MXFP8: group 32). Each block of a layer's K (or
/// V) is its data, [block_tokens, kv_heads, head_dim] in the layout's order, then its scales,
/// [block_tokens, kv_heads, head_dim / group] in the same order (kv_cache::scale_tensor). group 0:
/// no scales in the cache (static per-tensor or per-head scales are the engine's constants).
struct kv_scales {
    std::uint32_t group = 0;
    dtype type = dtype::f32;
};

/// The geometry of a paged KV cache. For the mla layout, kv_heads is 1 and head_dim is the
/// latent's size (kv_lora_rank + rope dim).
struct kv_geometry {
    std::uint32_t layers = 0;
    std::uint32_t kv_heads = 0;
    std::uint32_t head_dim = 0;
    dtype type = dtype::f16;
    std::uint32_t block_tokens = 16;
    /// Most blocks the cache can hold at once (all sequences together); at most INT32_MAX so
    /// block ids fit the int32 block tables kernels read.
    std::uint32_t max_blocks = 0;
    /// Longest sequence the engine allows, in tokens: the sequence_contiguous layout reserves
    /// this much address space per sequence (kv/layout.hpp). 0: not set; the paged layouts
    /// ignore it.
    std::uint32_t max_tokens_per_sequence = 0;
    /// Scales kept beside each block's data (quantized KV); none by default.
    kv_scales scales{};

    /// Elements of a head's row: head_dim values, two an element for fp4_e2m1x2.
    [[nodiscard]] constexpr std::size_t row_elements() const noexcept { return head_dim / values_per_element(type); }
    /// Scales of a head's row (0 without scales).
    [[nodiscard]] constexpr std::size_t row_scales() const noexcept { return scales.group == 0 ? 0 : head_dim / scales.group; }
    /// Bytes of one token of one layer's K (or V): its data and its scales.
    [[nodiscard]] constexpr std::size_t token_tensor_bytes() const noexcept {
        return std::size_t{kv_heads} * (row_elements() * size_of(type) + row_scales() * size_of(scales.type));
    }
    /// Bytes of one block of one layer's K (or V), data then scales.
    [[nodiscard]] constexpr std::size_t block_tensor_bytes() const noexcept {
        return std::size_t{block_tokens} * token_tensor_bytes();
    }
    /// Bytes of the data of one block of one layer's K (or V): where its scales begin.
    [[nodiscard]] constexpr std::size_t block_data_bytes() const noexcept {
        return std::size_t{block_tokens} * kv_heads * row_elements() * size_of(type);
    }
    /// Bytes of one block across every layer, K and V (the mla layout, without V, needs half:
    /// its Layout::span_bytes says what a span takes).
    [[nodiscard]] constexpr std::size_t block_bytes() const noexcept { return 2 * std::size_t{layers} * block_tensor_bytes(); }
    /// Bytes of the whole cache at max_blocks.
    [[nodiscard]] constexpr std::size_t total_bytes() const noexcept { return block_bytes() * max_blocks; }
    /// Blocks needed to hold `tokens` tokens.
    [[nodiscard]] constexpr std::size_t blocks_for(std::size_t tokens) const noexcept {
        return tokens / block_tokens + (tokens % block_tokens != 0);
    }

    /// Throws invalid_argument naming the field when a field is zero, a block id could exceed
    /// INT32_MAX, a size would overflow, or the scales do not fit the rows (a group that does
    /// not divide head_dim, scales that would leave the next block's data misaligned).
    void validate() const {
        auto zero = [](const char* field) {
            return invalid_argument(std::string("kv_geometry.") + field + " must not be zero");
        };
        if (layers == 0) throw zero("layers");
        if (kv_heads == 0) throw zero("kv_heads");
        if (head_dim == 0) throw zero("head_dim");
        if (block_tokens == 0) throw zero("block_tokens");
        if (max_blocks == 0) throw zero("max_blocks");
        if (size_of(type) == 0) throw invalid_argument("kv_geometry.type is not a known dtype");
        if (head_dim % values_per_element(type) != 0) {
            throw invalid_argument("kv_geometry.head_dim " + std::to_string(head_dim) +
                                   " must be even for fp4_e2m1x2 (two values an element)");
        }
        validate_scales();
        if (max_blocks > static_cast<std::uint32_t>(std::numeric_limits<std::int32_t>::max())) {
            throw invalid_argument("kv_geometry.max_blocks " + std::to_string(max_blocks) +
                                   " exceeds INT32_MAX: block ids must fit int32 block tables");
        }
        // Overflow: in integer steps, each checked (a row's bytes cannot overflow: 32-bit factors).
        constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
        std::size_t bytes = row_elements() * size_of(type) + row_scales() * size_of(scales.type);
        for (std::size_t factor : {std::size_t{kv_heads}, std::size_t{block_tokens}, std::size_t{2} * layers,
                                   std::size_t{max_blocks}}) {
            if (bytes > max / factor) {
                throw invalid_argument("kv_geometry: the cache size overflows size_t");
            }
            bytes *= factor;
        }
        const std::size_t slots = std::size_t{max_blocks} * block_tokens;
        if (slots > static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())) {
            throw invalid_argument("kv_geometry: slot ids overflow int64");
        }
    }

private:
    void validate_scales() const {
        if (scales.group == 0) {
            return;
        }
        const std::string what = "kv_geometry.scales.group " + std::to_string(scales.group);
        if (head_dim % scales.group != 0 || scales.group % values_per_element(type) != 0) {
            throw invalid_argument(what + " must divide head_dim " + std::to_string(head_dim) +
                                   (values_per_element(type) > 1 ? " and be even (fp4_e2m1x2)" : ""));
        }
        if (size_of(scales.type) == 0 || values_per_element(scales.type) != 1) {
            throw invalid_argument("kv_geometry.scales.type must be f32, f16, bf16, fp8_e4m3 or fp8_e5m2");
        }
        // The scales follow each block's data and the next block's data follows them: both must
        // start on their own element's boundary.
        const std::size_t data = std::size_t{kv_heads} * (head_dim / values_per_element(type)) * size_of(type);
        const std::size_t scale = std::size_t{kv_heads} * (head_dim / scales.group) * size_of(scales.type);
        if (data % size_of(scales.type) != 0 || scale % size_of(type) != 0) {
            throw invalid_argument(what + ": a token's " + std::to_string(scale) + " bytes of scales and " +
                                   std::to_string(data) + " bytes of data must each be a multiple of the other's "
                                   "element size (" + std::to_string(size_of(type)) + " and " +
                                   std::to_string(size_of(scales.type)) + ")");
        }
    }
};

} // namespace vmmpp
