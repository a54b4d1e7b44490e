// vmmpp/quota/concept.hpp: who may commit how much. A pool asks its quota before every commit
// and tells it after every decommit.
#pragma once

#include <concepts>
#include <cstddef>

namespace vmmpp {

/// A quota policy: `acquire(bytes)` takes bytes from the quota or throws vmmpp::over_quota and
/// changes nothing; `release(bytes)` gives them back and never throws.
template <class Q>
concept quota_policy = std::copy_constructible<Q> && requires(Q& q, std::size_t n) {
    { q.acquire(n) } -> std::same_as<void>;
    { q.release(n) } noexcept -> std::same_as<void>;
};

} // namespace vmmpp
