// vmmpp/kv/tensor.hpp: a description of one layer's K or V as a strided 4-D tensor
// [blocks, block_tokens, kv_heads, head_dim] (in every layout; the strides say the order in
// memory), what a kernel or DLPack needs to read it.
#pragma once

#include <array>
#include <cstdint>

#include "vmmpp/kv/geometry.hpp"

namespace vmmpp {

/// Pointer, element type, device, shape and strides (in elements) of a KV tensor.
struct kv_tensor {
    void* data = nullptr;
    dtype type = dtype::f16;
    int device = -1;  ///< CUDA device, or -1 for host memory
    std::array<std::int64_t, 4> shape{};
    std::array<std::int64_t, 4> strides{};
};

} // namespace vmmpp
