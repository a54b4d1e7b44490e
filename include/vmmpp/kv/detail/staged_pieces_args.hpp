// vmmpp/kv/detail/staged_pieces_args.hpp: the argument of the staged-pieces kernel
// (tools/kernels/staged_pieces.cu, which declares the same struct; the fake driver of the tests
// reads it too). No CUDA header needed.
#pragma once

#include <cstdint>

namespace vmmpp::detail {

/// Blocks one launch of the kernel moves at most (its argument holds their addresses).
inline constexpr unsigned staged_max_blocks = 64;

/// What one launch moves: block j's piece r between the cache (block[j] + r * pitch) and the
/// staging buffer (staging + (j * rows + r) * width); one CTA per piece (grid = blocks x rows).
struct staged_pieces_args {
    unsigned long long block[staged_max_blocks];  ///< address of each block's first piece in the cache
    unsigned long long staging;                   ///< the staging buffer
    unsigned long long pitch;                     ///< bytes between a block's pieces, in the cache
    unsigned long long width;                     ///< bytes of a piece: a multiple of 16, addresses 16-aligned
    unsigned rows;                                ///< pieces per block
    unsigned to_staging;                          ///< 1: cache -> staging (gather); 0: staging -> cache (scatter)
};
static_assert(sizeof(staged_pieces_args) == 544, "must match the kernel's parameter (the generated PTX says 544)");

} // namespace vmmpp::detail
