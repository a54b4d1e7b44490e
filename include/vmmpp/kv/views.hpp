// vmmpp/kv/views.hpp: range-v3 views over a kv_cache, computed on demand (nothing is copied):
// its sequences, a sequence's blocks, and the committed regions an engine registers with an
// RDMA library (NIXL/UCX).
// vmmpp: host-only (range-v3 0.12 does not compile under nvcc; include it from .cpp files only)
#pragma once

#include <cstddef>
#include <cstdint>

#include <range/v3/view/filter.hpp>
#include <range/v3/view/iota.hpp>
#include <range/v3/view/transform.hpp>
#include <range/v3/view/map.hpp>

#include "vmmpp/kv/cache.hpp"

namespace vmmpp {

/// A committed piece of a pool: what to register for RDMA.
struct memory_region {
    std::byte* address = nullptr;
    std::size_t bytes = 0;
    int device = -1;  ///< CUDA device, or -1 for host memory
};

/// One block of a sequence: its position in the sequence, its id, how many tokens it holds.
struct sequence_block {
    std::size_t index = 0;
    std::int32_t id = 0;
    std::size_t tokens = 0;
};

/// The committed regions of a pool, one per committed growth unit, lowest address first.
/// Reflects the pool as it is when iterated; do not iterate while another thread changes it.
template <class Config>
[[nodiscard]] auto committed_regions(const elastic_pool<Config>& pool) {
    return ranges::views::iota(std::size_t{0}, pool.unit_count()) |
           ranges::views::filter([&pool](std::size_t u) { return pool.is_unit_committed(u); }) |
           ranges::views::transform([&pool](std::size_t u) {
               return memory_region{pool.base() + pool.unit_offset_of(u), pool.unit_bytes_of(u), pool.device()};
           });
}

/// The committed regions of a cache's pool.
template <class Config, class Layout>
[[nodiscard]] auto committed_regions(const kv_cache<Config, Layout>& cache) {
    return committed_regions(cache.pool());
}

/// The blocks of `seq`, in token order. The view is valid until the sequence changes.
template <class Config, class Layout>
[[nodiscard]] auto blocks(const kv_cache<Config, Layout>& cache, seq_id seq) {
    const auto table = cache.block_table(seq);
    const std::size_t tokens = cache.tokens(seq);
    const std::size_t bt = cache.geometry().block_tokens;
    return ranges::views::iota(std::size_t{0}, table.size()) |
           ranges::views::transform([table, tokens, bt](std::size_t i) {
               const std::size_t in_block = i + 1 < table.size() ? bt : tokens - i * bt;
               return sequence_block{i, table[i], in_block};
           });
}

/// The ids of a cache's live sequences, ascending. Valid until a sequence is added or freed.
template <class Config, class Layout>
[[nodiscard]] auto sequence_ids(const kv_cache<Config, Layout>& cache) {
    return cache.sequence_map() | ranges::views::keys;
}

} // namespace vmmpp
