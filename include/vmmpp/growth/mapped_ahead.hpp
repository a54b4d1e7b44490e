// vmmpp/growth/mapped_ahead.hpp: growth off the critical path. A pool whose growth policy is
// mapped_ahead<Inner> runs a background mapper thread that keeps a few committed-but-unused units
// ahead of demand, so the call that needs new memory usually finds it mapped already, and gives
// empty units back lazily: mapping and unmapping cost the driver per handle (docs/ARCHITECTURE.md,
// "Driver costs"), and with the mapper an append pays neither. The mapper's decisions live in
// vmmpp/growth/mapper.hpp, its thread in vmmpp/pool/mapper_agent.hpp.
#pragma once

#include <chrono>
#include <cstddef>

#include "vmmpp/growth/adaptive_extents.hpp"
#include "vmmpp/growth/concept.hpp"
#include "vmmpp/growth/page_granular.hpp"

namespace vmmpp {

/// Background mapping over `Inner`'s unit size (page_granular: 2 MiB pages; chunked<N>: N pages).
///
/// The pool's mapper thread keeps between `low_watermark` and `high_watermark` spare units
/// (committed, charged to the quota, unused): when spares fall below the low watermark it maps
/// units up to the high one, choosing the units just past those the pool handed out last (where a
/// lowest-first block allocator goes next) and any the caller announced with
/// elastic_pool::will_need. Units that empty stay committed; spares above the high watermark go back
/// once idle for `release_delay`, oldest first. Under budget pressure (another model's commit
/// refused) every spare goes back at once. Releases never call the driver on the caller's thread.
template <growth_policy Inner = page_granular>
struct mapped_ahead {
    static_assert(Inner::is_elastic, "vmmpp::mapped_ahead needs an elastic inner growth policy");
    static constexpr bool is_elastic = true;
    static constexpr bool maps_in_background = true;

    Inner inner{};
    /// Below this many spare units the mapper wakes and refills.
    std::size_t low_watermark = 4;
    /// The mapper refills up to this many spare units; more than this go back after the delay.
    std::size_t high_watermark = 16;
    /// How long a unit above the high watermark stays idle before it goes back.
    std::chrono::milliseconds release_delay{200};
    /// While the pool is growing (a unit was taken within the last release_delay) the mapper
    /// checks its spares this often instead of being woken by the caller: a wake-up would cost
    /// the caller a system call of several microseconds on the critical path.
    std::chrono::microseconds poll_interval{100};

    [[nodiscard]] std::size_t unit_pages() const noexcept { return inner.unit_pages(); }
    /// Over adaptive_extents, the mapper's commits (and a caller's) cover extents as its do.
    [[nodiscard]] std::size_t max_extent_units() const noexcept
        requires extent_growth_policy<Inner>
    {
        return inner.max_extent_units();
    }
    [[nodiscard]] std::uint64_t extent_fast_growth_rate() const noexcept
        requires extent_growth_policy<Inner>
    {
        return inner.extent_fast_growth_rate();
    }
    /// Releases keep every idle unit: the mapper decides what goes back, on its own thread.
    [[nodiscard]] std::size_t idle_units_to_keep(std::size_t, std::size_t idle_units) const noexcept {
        return idle_units;
    }
};

/// A growth policy whose pool maps and unmaps on a background thread.
template <class G>
concept background_growth_policy = growth_policy<G> && requires(const G& g) {
    requires G::maps_in_background;
    { g.low_watermark } -> std::convertible_to<std::size_t>;
    { g.high_watermark } -> std::convertible_to<std::size_t>;
    { g.release_delay } -> std::convertible_to<std::chrono::milliseconds>;
    { g.poll_interval } -> std::convertible_to<std::chrono::microseconds>;
};

static_assert(background_growth_policy<mapped_ahead<>>, "vmmpp::mapped_ahead must model vmmpp::background_growth_policy");

} // namespace vmmpp
