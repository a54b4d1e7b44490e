// Tokens' values in a kv_cache of any layout, through its tensor descriptors: what the randomized
// tests write into a token's slot and read back (one element of layer 0's K and of the last
// layer's V, or mla's latent).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "vmmpp/kv/layout.hpp"
#include "vmmpp/kv/tensor.hpp"

namespace vmmpp_test {

using vmmpp::kv_part;

/// The last of a layer's parts: V, or K (the latent) for mla.
template <class Cache>
constexpr kv_part last_part = Cache::layout_type::parts == 2 ? kv_part::value : kv_part::key;

/// Element [slot's block, slot's token, last head, last dim] of a layer's K or V, found through
/// the cache's tensor descriptor (its strides).
template <class Cache>
std::byte* element_at(const Cache& c, std::uint32_t layer, kv_part part, std::int64_t slot) {
    const auto& g = c.geometry();
    const vmmpp::kv_tensor t = c.tensor(layer, part);
    const std::int64_t index = slot / g.block_tokens * t.strides[0] + slot % g.block_tokens * t.strides[1] +
                               (t.shape[2] - 1) * t.strides[2] + (t.shape[3] - 1) * t.strides[3];
    return static_cast<std::byte*>(t.data) + index * 2;
}

/// Writes a value into the K of layer 0 and the V (mla: the latent) of the last layer at a
/// token's slot, through the tensor descriptors.
template <class Cache>
void write_token(Cache& c, std::int64_t slot, std::uint16_t value) {
    std::memcpy(element_at(c, 0, kv_part::key, slot), &value, 2);
    std::memcpy(element_at(c, c.geometry().layers - 1, last_part<Cache>, slot), &value, 2);
}
template <class Cache>
std::pair<std::uint16_t, std::uint16_t> read_token(const Cache& c, std::int64_t slot) {
    std::uint16_t k = 0, v = 0;
    std::memcpy(&k, element_at(c, 0, kv_part::key, slot), 2);
    std::memcpy(&v, element_at(c, c.geometry().layers - 1, last_part<Cache>, slot), 2);
    return {k, v};
}

} // namespace vmmpp_test
