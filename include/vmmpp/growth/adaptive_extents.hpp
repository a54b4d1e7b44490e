// vmmpp/growth/adaptive_extents.hpp: page-granular elasticity with the driver cost of large
// handles while the pool grows fast. The driver's cost is per mapping, not per byte
// (docs/ARCHITECTURE.md, "Driver costs"), so a pool that maps one page per commit grows only as
// fast as the driver maps pages, and one that always maps large handles keeps memory that a few
// live blocks pin. This policy holds and gives back 2 MiB
// units, but a commit made while the pool grows fast covers a run of units, an extent, mapped
// as one handle: 1, 2, 4, ... up to max_extent_pages, and back down as growth slows. An extent
// goes back whole, once none of its units is held.
#pragma once

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>

#include "vmmpp/growth/concept.hpp"

namespace vmmpp {

/// Units of one page, committed in extents whose size follows the rate of growth.
///
/// When the previous commit's extent was used up at `fast_growth_bytes_per_second` or faster,
/// the next one covers twice as many units (at most `max_extent_pages`); at half that rate as
/// many; slower, half as many per halving of the rate, down to one. A commit after the pool
/// gave memory back covers one unit: under churn (sequences ending while others start) large
/// extents would stay pinned by a few live blocks, so only uninterrupted growth earns them.
/// The units past the ones a caller needs become spares (committed, idle); a lowest-first block
/// allocator (kv_cache's) takes them next. At most `spare_pages` idle units stay committed after
/// a release; an extent that is idle as a whole goes back (highest first) beyond that, one that
/// still holds a block stays.
struct adaptive_extents {
    static constexpr bool is_elastic = true;
    /// The largest extent, in pages: 256 pages of 2 MiB are 512 MiB, where the driver's cost per
    /// byte is near its floor (docs/ARCHITECTURE.md), and a stream of 2 MiB blocks commits on
    /// fewer than 1 % of its calls.
    std::size_t max_extent_pages = 256;
    /// Growth at least this fast (bytes per second) doubles the next extent; 0: never (one page
    /// per commit).
    std::uint64_t fast_growth_bytes_per_second = 1'000'000'000;
    /// Idle pages kept committed for the next growth (in whole extents).
    std::size_t spare_pages = 16;

    [[nodiscard]] std::size_t unit_pages() const noexcept { return 1; }
    [[nodiscard]] std::size_t max_extent_units() const noexcept { return std::max<std::size_t>(1, max_extent_pages); }
    [[nodiscard]] std::uint64_t extent_fast_growth_rate() const noexcept { return fast_growth_bytes_per_second; }
    [[nodiscard]] std::size_t idle_units_to_keep(std::size_t, std::size_t idle_units) const noexcept {
        return std::min(idle_units, spare_pages);
    }
};

/// A growth policy whose commits may cover several units at once (an extent, one handle),
/// sized by the rate of growth: the pool asks max_extent_units() and extent_fast_growth_rate()
/// (bytes per second).
template <class G>
concept extent_growth_policy = growth_policy<G> && requires(const G& g) {
    { g.max_extent_units() } -> std::same_as<std::size_t>;
    { g.extent_fast_growth_rate() } -> std::same_as<std::uint64_t>;
};

static_assert(extent_growth_policy<adaptive_extents>, "vmmpp::adaptive_extents must model vmmpp::extent_growth_policy");

namespace detail {

/// The size of a pool's next commit, in units, for an extent growth policy. The rate of growth
/// is the last extent's bytes over the time until the next commit: at the fast rate or above
/// the size doubles, at half of it it stays, and it halves for every further halving of the
/// rate (a steady stream settles on one size instead of see-sawing); after the pool gave memory
/// back, one unit again. Takes the time as an argument, so tests drive it with their own clock.
template <class Clock = std::chrono::steady_clock>
class extent_sizer {
public:
    using time_point = typename Clock::time_point;

    /// `fast_bytes_per_second` 0: always one unit.
    extent_sizer(std::size_t max_units, std::size_t unit_bytes, std::uint64_t fast_bytes_per_second) noexcept
        : max_(std::max<std::size_t>(1, max_units)), unit_bytes_(unit_bytes), fast_(fast_bytes_per_second) {}

    /// Units a commit starting at `now` should cover (at least one). Changes nothing: a commit
    /// that fails leaves the sizer as it was.
    [[nodiscard]] std::size_t size_at(time_point now) const noexcept {
        if (!started_ || shrunk_ || fast_ == 0) {
            return 1;
        }
        const double seconds = std::chrono::duration<double>(now - last_).count();
        const double rate = seconds > 0 ? static_cast<double>(size_ * unit_bytes_) / seconds : 1e300;
        const double fast = static_cast<double>(fast_);
        if (rate >= fast) {
            return std::min(max_, size_ * 2);
        }
        std::size_t size = size_;
        for (double r = rate * 2; r < fast && size > 1; r *= 2) {
            size /= 2;  // one halving per halving of the rate below half the fast one
        }
        return size;
    }
    /// A commit that started at `now` succeeded, with the size size_at(now) gave (the next
    /// sizes follow from it, not from how much of it the span had room for).
    void committed(time_point now) noexcept {
        size_ = size_at(now);
        started_ = true;
        shrunk_ = false;
        last_ = now;
    }
    /// The pool gave memory back: it is not growing but churning. The next commit covers one
    /// unit, and doubling starts again from there.
    void gave_back() noexcept { shrunk_ = true; }
    /// The size the last commit was given (1 before any).
    [[nodiscard]] std::size_t current() const noexcept { return size_; }
    /// The largest size it gives.
    [[nodiscard]] std::size_t max_units() const noexcept { return max_; }

private:
    std::size_t max_;
    std::size_t unit_bytes_;
    std::uint64_t fast_;
    std::size_t size_ = 1;
    bool started_ = false;
    bool shrunk_ = false;
    time_point last_{};
};

/// How a pool with growth policy `G` sizes its commits: in rate-sized extents for an extent
/// growth policy, one unit each otherwise. Units are `unit_bytes` long.
template <growth_policy G, class Clock = std::chrono::steady_clock>
[[nodiscard]] extent_sizer<Clock> extent_sizer_for(const G& growth, std::size_t unit_bytes) noexcept {
    if constexpr (extent_growth_policy<G>) {
        return {growth.max_extent_units(), unit_bytes, growth.extent_fast_growth_rate()};
    } else {
        return {1, unit_bytes, 0};
    }
}

} // namespace detail
} // namespace vmmpp
