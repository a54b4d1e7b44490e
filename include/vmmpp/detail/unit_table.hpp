// vmmpp/detail/unit_table.hpp: a pool's bookkeeping of its growth units (what is committed, held,
// idle, in flight, retired, and which fence each waits for), shared by the pool and its background
// mapper's decisions (vmmpp/growth/mapper.hpp). Plain data: whoever uses it holds the pool's lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <vector>

namespace vmmpp::detail {

/// Where a growth unit is in its life. A unit the mapper maps or unmaps outside the pool's lock
/// is "in flight" (committing, decommitting): nobody else touches it meanwhile.
enum class unit_state : std::uint8_t {
    uncommitted,   ///< no physical memory
    committed,     ///< backed; held by something, or idle (a spare)
    committing,    ///< the mapper is mapping it
    decommitting,  ///< the mapper is unmapping it
    retired,       ///< out of service after a decommit the backing left half done
};

/// The units of one pool. Not thread safe: the pool's lock guards it.
struct unit_table {
    /// `units` uncommitted units.
    explicit unit_table(std::size_t units) : state(units, unit_state::uncommitted), held_pages(units, 0), fence(units, 0) {}

    std::vector<unit_state> state;
    std::vector<std::uint32_t> held_pages;  ///< per unit: how many of its pages something holds
    std::vector<std::uint64_t> fence;       ///< per unit: the fence its memory waits for before it goes back
    std::set<std::size_t> idle;             ///< committed units nothing holds (spares), by offset
    std::size_t committed = 0;              ///< units committed (idle or held)

    [[nodiscard]] std::size_t size() const noexcept { return state.size(); }
    [[nodiscard]] bool is_in_flight(std::size_t u) const noexcept {
        return state[u] == unit_state::committing || state[u] == unit_state::decommitting;
    }
    /// Committed and held by nothing.
    [[nodiscard]] bool is_idle(std::size_t u) const noexcept {
        return state[u] == unit_state::committed && held_pages[u] == 0;
    }
};

} // namespace vmmpp::detail
