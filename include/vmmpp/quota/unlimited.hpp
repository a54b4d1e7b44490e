// vmmpp/quota/unlimited.hpp: no quota: only the backing's capacity and the device limit a pool.
#pragma once

#include <cstddef>

#include "vmmpp/quota/concept.hpp"

namespace vmmpp {

/// Grants every request.
struct unlimited {
    void acquire(std::size_t) noexcept {}
    void release(std::size_t) noexcept {}
};

static_assert(quota_policy<unlimited>, "vmmpp::unlimited must model vmmpp::quota_policy");

} // namespace vmmpp
