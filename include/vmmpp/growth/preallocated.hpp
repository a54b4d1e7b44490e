// vmmpp/growth/preallocated.hpp: no growth at all: the pool commits its whole span at
// construction, as a static engine does, and never gives memory back.
#pragma once

#include <cstddef>
#include <limits>

#include "vmmpp/growth/concept.hpp"

namespace vmmpp {

/// Commit everything up front (one unit as large as the span); keep it all until destruction.
struct preallocated {
    static constexpr bool is_elastic = false;
    [[nodiscard]] std::size_t unit_pages() const noexcept { return std::numeric_limits<std::size_t>::max(); }
    [[nodiscard]] std::size_t idle_units_to_keep(std::size_t, std::size_t idle_units) const noexcept {
        return idle_units;
    }
};

static_assert(growth_policy<preallocated>, "vmmpp::preallocated must model vmmpp::growth_policy");

} // namespace vmmpp
