// vmmpp/quota/limit_change.hpp: what changing a limit at run time did. Raising a limit takes
// effect at once; lowering one takes the spares and kept handles of the pools charged to it back
// at once, refuses commits above the new limit from then on, and leaves live blocks where they
// are: until they fit, the change is pending and names the bytes still over.
#pragma once

#include <cstddef>
#include <string>

namespace vmmpp {

/// The result of a run-time limit change (vmmpp::budget, vmmpp::process_budget).
struct limit_change {
    /// `applied`: what is charged fits the new limit. `pending`: the limit is in force (commits
    /// above it are refused), but `bytes_over` are still charged above it, held by live blocks
    /// (or by another process's spares that it has not given back yet).
    enum class state { applied, pending };

    state status = state::applied;
    std::size_t limit = 0;       ///< the new limit
    std::size_t previous = 0;    ///< the limit before the change
    std::size_t committed = 0;   ///< bytes charged after the reclaim the change made
    std::size_t bytes_over = 0;  ///< committed - limit when pending, else 0
    std::size_t reclaimed = 0;   ///< bytes the change took back from spares and kept handles

    /// Whether the charged bytes fit the new limit.
    [[nodiscard]] bool applied() const noexcept { return status == state::applied; }
};

/// `applied` or `pending`.
[[nodiscard]] inline const char* to_string(limit_change::state s) noexcept {
    return s == limit_change::state::applied ? "applied" : "pending";
}

namespace detail {
/// The change from `previous` to `limit` with `committed` charged after `reclaimed` came back.
[[nodiscard]] inline limit_change make_limit_change(std::size_t previous, std::size_t limit, std::size_t committed,
                                                    std::size_t reclaimed) noexcept {
    limit_change c;
    c.limit = limit;
    c.previous = previous;
    c.committed = committed;
    c.reclaimed = reclaimed;
    c.bytes_over = committed > limit ? committed - limit : 0;
    c.status = c.bytes_over > 0 ? limit_change::state::pending : limit_change::state::applied;
    return c;
}
} // namespace detail

} // namespace vmmpp
