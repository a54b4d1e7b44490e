// vmmpp/growth/chunked.hpp: growth in chunks of N pages, each one physical handle on the vmm
// backing. The driver's cost is per handle, not per byte (docs/ARCHITECTURE.md has the
// measurements), so chunks trade elasticity for much cheaper growth.
#pragma once

#include <algorithm>
#include <cstddef>

#include "vmmpp/growth/concept.hpp"

namespace vmmpp {

/// Commit `PagesPerChunk` pages at a time. A chunk goes back only when all of it is empty and
/// the pool stays at or above `low_watermark_chunks` committed chunks without it.
template <std::size_t PagesPerChunk>
struct chunked {
    static_assert(PagesPerChunk > 0, "vmmpp::chunked needs at least one page per chunk");
    static constexpr bool is_elastic = true;
    static constexpr std::size_t pages_per_chunk = PagesPerChunk;
    /// Committed chunks the pool never shrinks below.
    std::size_t low_watermark_chunks = 0;

    [[nodiscard]] std::size_t unit_pages() const noexcept { return PagesPerChunk; }
    [[nodiscard]] std::size_t idle_units_to_keep(std::size_t committed_units, std::size_t idle_units) const noexcept {
        const std::size_t live = committed_units - idle_units;
        const std::size_t wanted = low_watermark_chunks > live ? low_watermark_chunks - live : 0;
        return std::min(idle_units, wanted);
    }
};

static_assert(growth_policy<chunked<16>>, "vmmpp::chunked must model vmmpp::growth_policy");

} // namespace vmmpp
