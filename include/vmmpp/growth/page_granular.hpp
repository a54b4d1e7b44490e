// vmmpp/growth/page_granular.hpp: the finest elasticity: commit exactly the pages that hold
// live blocks, give each page back as soon as it empties (past a few optional spares, which
// save the next growth a driver round trip).
#pragma once

#include <algorithm>
#include <cstddef>

#include "vmmpp/growth/concept.hpp"

namespace vmmpp {

/// One page per commit; at most `spare_pages` empty pages stay committed.
struct page_granular {
    static constexpr bool is_elastic = true;
    /// Empty pages kept committed for the next growth.
    std::size_t spare_pages = 0;

    [[nodiscard]] std::size_t unit_pages() const noexcept { return 1; }
    [[nodiscard]] std::size_t idle_units_to_keep(std::size_t, std::size_t idle_units) const noexcept {
        return std::min(idle_units, spare_pages);
    }
};

static_assert(growth_policy<page_granular>, "vmmpp::page_granular must model vmmpp::growth_policy");

} // namespace vmmpp
