// vmmpp/detail/unit_table.hpp: a pool's bookkeeping of its growth units (what is committed, held,
// idle, in flight, retired, and which fence each waits for) and of the extents they were
// committed in, shared by the pool and its background mapper's decisions
// (vmmpp/growth/mapper.hpp). Plain data: whoever uses it holds the pool's lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <vector>

#include "vmmpp/detail/fence_queue.hpp"

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

/// Units [first, last], or none (the default): the units a call commits, which room made for
/// it must not give back.
struct unit_span {
    std::size_t first = SIZE_MAX;
    std::size_t last = 0;
    /// Whether units [begin, end) and this span share a unit.
    [[nodiscard]] bool overlaps(std::size_t begin, std::size_t end) const noexcept {
        return first <= last && begin <= last && end > first;
    }
};

/// A set of unit numbers below a fixed bound: a flag per unit and a count, so that taking a
/// unit out and putting it back (every block an engine frees and takes) allocates nothing.
class unit_set {
public:
    explicit unit_set(std::size_t units) : member_(units, 0) {}

    /// Adds u; .second is whether it was not in the set before (as std::set::insert).
    struct insert_result {
        std::size_t unit;
        bool second;
    };
    insert_result insert(std::size_t u) noexcept {
        const bool added = member_[u] == 0;
        member_[u] = 1;
        count_ += added ? 1 : 0;
        return {u, added};
    }
    /// Removes u; returns 1 if it was in the set, else 0 (as std::set::erase).
    std::size_t erase(std::size_t u) noexcept {
        const bool had = member_[u] != 0;
        member_[u] = 0;
        count_ -= had ? 1 : 0;
        return had ? 1 : 0;
    }
    [[nodiscard]] bool contains(std::size_t u) const noexcept { return member_[u] != 0; }
    [[nodiscard]] std::size_t size() const noexcept { return count_; }
    [[nodiscard]] bool empty() const noexcept { return count_ == 0; }
    /// Calls f(u) for every member, ascending (a walk over all units: for statistics).
    template <class F>
    void for_each(F&& f) const {
        for (std::size_t u = 0; u < member_.size(); ++u) {
            if (member_[u] != 0) {
                f(u);
            }
        }
    }

private:
    std::vector<std::uint8_t> member_;
    std::size_t count_ = 0;
};

/// The units of one pool. Not thread safe: the pool's lock guards it.
///
/// Extents: one backing commit covers a run of consecutive units, an extent (one physical
/// handle on the vmm backing, which the driver maps and unmaps only whole). Its units are held
/// and counted one by one, but they go back together, once all of them are idle.
struct unit_table {
    /// `units` uncommitted units.
    explicit unit_table(std::size_t units)
        : state(units, unit_state::uncommitted), held_pages(units, 0), fences(units), extent_first(units, 0),
          extent_units(units, 0), extent_idle(units, 0), extent_commit(units, 0), idle(units) {}

    std::vector<unit_state> state;
    std::vector<std::uint32_t> held_pages;  ///< per unit: how many of its pages something holds
    std::vector<fence_set> fences;          ///< per unit: the fences (one per stream) its memory waits for before it goes back
    std::size_t committed = 0;              ///< units committed (idle or held)
    std::vector<std::uint32_t> extent_first;  ///< per unit (not uncommitted): the first unit of its extent
    std::vector<std::uint32_t> extent_units;  ///< per extent's first unit: how many units it covers
    std::vector<std::uint32_t> extent_idle;   ///< per extent's first unit: how many of them are idle
    std::vector<std::uint64_t> extent_commit; ///< per extent's first unit: the number of the commit that made it
    std::set<std::size_t> idle_extents;       ///< first units of committed extents all of whose units are idle
    unit_set idle;                            ///< committed units nothing holds (spares)

    /// Records units [first, first + n) as one extent, none of them idle yet.
    void set_extent(std::size_t first, std::size_t n) noexcept {
        for (std::size_t u = first; u < first + n; ++u) {
            extent_first[u] = static_cast<std::uint32_t>(first);
        }
        extent_units[first] = static_cast<std::uint32_t>(n);
        extent_idle[first] = 0;
    }
    /// Unit u joined `idle`: its extent may now be idle as a whole. Allocates (a set node).
    void note_idle(std::size_t u) {
        const std::size_t f = extent_first[u];
        if (++extent_idle[f] == extent_units[f]) {
            try {
                idle_extents.insert(f);
            } catch (...) {
                --extent_idle[f];
                throw;
            }
        }
    }
    /// Unit u left `idle` (taken, or going back with its extent).
    void note_not_idle(std::size_t u) noexcept {
        const std::size_t f = extent_first[u];
        if (extent_idle[f]-- == extent_units[f]) {
            idle_extents.erase(f);
        }
    }

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
