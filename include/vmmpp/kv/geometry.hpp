// vmmpp/kv/geometry.hpp: the shape of a KV cache: layers, heads, head size, element type, tokens
// per block and the most blocks it may ever hold. Validated once, so every size computed from
// it later is known not to overflow.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "vmmpp/error.hpp"

namespace vmmpp {

/// Element type of K and V, with DLPack-compatible codes.
enum class dtype : std::uint8_t { f32, f16, bf16, fp8_e4m3, fp8_e5m2 };

/// Bytes per element.
[[nodiscard]] constexpr std::size_t size_of(dtype t) noexcept {
    switch (t) {
    case dtype::f32: return 4;
    case dtype::f16:
    case dtype::bf16: return 2;
    case dtype::fp8_e4m3:
    case dtype::fp8_e5m2: return 1;
    }
    return 0;
}

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

    /// Bytes of one block of one layer's K (or V): block_tokens * kv_heads * head_dim * size.
    [[nodiscard]] constexpr std::size_t block_tensor_bytes() const noexcept {
        return std::size_t{block_tokens} * kv_heads * head_dim * size_of(type);
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
    /// INT32_MAX, or a size would overflow.
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
        if (max_blocks > static_cast<std::uint32_t>(std::numeric_limits<std::int32_t>::max())) {
            throw invalid_argument("kv_geometry.max_blocks " + std::to_string(max_blocks) +
                                   " exceeds INT32_MAX: block ids must fit int32 block tables");
        }
        // Overflow: compute in long double-free integer steps, each checked.
        constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
        std::size_t bytes = size_of(type);
        for (std::size_t factor : {std::size_t{head_dim}, std::size_t{kv_heads}, std::size_t{block_tokens},
                                   std::size_t{2} * layers, std::size_t{max_blocks}}) {
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
};

} // namespace vmmpp
