// A word pattern that depends on where a word lives, written and checked by kernels: what the
// shared-pages test uses to prove two processes see the same bytes.
#pragma once

#include <cstddef>

namespace vmmpp_test {

__host__ __device__ inline unsigned pattern_word(std::size_t byte_offset, unsigned seed) {
    return seed ^ static_cast<unsigned>((byte_offset / 4) * 2654435761u);
}

/// Fills words [p, p+bytes) whose offset in the span is `span_offset`.
__global__ void fill_pattern(unsigned* p, std::size_t bytes, std::size_t span_offset, unsigned seed) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < bytes / 4; i += std::size_t{gridDim.x} * blockDim.x) {
        p[i] = pattern_word(span_offset + i * 4, seed);
    }
}

/// Counts words of [p, p+bytes) that differ from the pattern into *bad.
__global__ void check_pattern(const unsigned* p, std::size_t bytes, std::size_t span_offset, unsigned seed,
                              unsigned long long* bad) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < bytes / 4; i += std::size_t{gridDim.x} * blockDim.x) {
        if (p[i] != pattern_word(span_offset + i * 4, seed)) {
            atomicAdd(bad, 1ull);
        }
    }
}

} // namespace vmmpp_test
