// vmmpp/growth/concept.hpp: what a growth policy decides for a pool: how many pages one commit
// covers (a "unit", which becomes one physical handle on the vmm backing), and how many empty
// units stay committed after a release.
#pragma once

#include <concepts>
#include <cstddef>

namespace vmmpp {

/// A growth policy. `is_elastic == false` means: commit the whole span when the pool is built
/// and never give it back (the static layout). Otherwise the pool commits `unit_pages()` pages
/// at a time, aligned to units, and after a release keeps
/// `idle_units_to_keep(committed_units, idle_units)` of its empty units committed.
template <class G>
concept growth_policy = std::copy_constructible<G> && requires(const G& g, std::size_t n) {
    { G::is_elastic } -> std::convertible_to<bool>;
    { g.unit_pages() } -> std::same_as<std::size_t>;
    { g.idle_units_to_keep(n, n) } -> std::same_as<std::size_t>;
};

} // namespace vmmpp
