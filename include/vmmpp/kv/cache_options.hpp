// vmmpp/kv/cache_options.hpp: the small types of kv_cache's interface (vmmpp/kv/cache.hpp):
// sequence ids, the cache's options beyond geometry and pool policies, what an append added.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vmmpp {

/// A sequence's id. Ids are never reused within a cache.
using seq_id = std::uint64_t;

/// Options of a kv_cache beyond its geometry and pool policies.
struct kv_cache_options {
    /// Stream for the cache's device work (copy-on-write copies), and the stream whose queued
    /// work free() and truncate() wait for, before memory goes back, when given no other. The
    /// default, the legacy default stream, also waits for every blocking stream's work.
    cudaStream_t stream = nullptr;
    /// The span is rounded up to a multiple of this (the backing's granularity must divide it).
    std::size_t span_alignment = std::size_t{2} << 20;
};

/// Tokens [first, first + count) of a sequence: what one append added.
struct token_range {
    std::size_t first = 0;
    std::size_t count = 0;
};

} // namespace vmmpp
