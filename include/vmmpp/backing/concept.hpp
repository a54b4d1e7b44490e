// vmmpp/backing/concept.hpp: what a backing is (where KV-cache bytes come from) and the
// accessibility properties it declares, named as in CCCL's cuda::mr so a reader who knows
// cuda::mr knows these: a backing declares them with a `get_property` friend.
#pragma once

#include <concepts>
#include <cstddef>

namespace vmmpp {

/// Property: a kernel on the backing's device can read and write its committed memory.
struct device_accessible {};
/// Property: host code can read and write its committed memory.
struct host_accessible {};

/// True when `T` declares property `P` (a `get_property(const T&, P)` found by ADL).
template <class T, class P>
concept has_property = requires(const T& t) { get_property(t, P{}); };

/// A backing owns (or borrows) one span of `capacity()` bytes at `base()` and moves pieces of
/// it between "reserved" and "committed" (backed by physical memory), in multiples of
/// `granularity()`. It is constructed from a capacity and its own `options`. `is_elastic` says
/// whether commit really obtains memory (vmm, host, managed) or only accounts (device, external).
template <class B>
concept backing =
    std::destructible<B> && std::constructible_from<B, std::size_t, typename B::options> &&
    requires(B& b, const B& cb, std::size_t n) {
        { B::is_elastic } -> std::convertible_to<bool>;
        { cb.granularity() } -> std::same_as<std::size_t>;
        { cb.base() } -> std::same_as<std::byte*>;
        { cb.capacity() } -> std::same_as<std::size_t>;
        { cb.committed_bytes() } -> std::same_as<std::size_t>;
        { b.commit(n, n) } -> std::same_as<void>;
        { b.decommit(n, n) } -> std::same_as<void>;
    };

/// The CUDA device a backing's memory lives on, or -1 for host memory.
template <backing B>
[[nodiscard]] int device_of(const B& b) noexcept {
    if constexpr (requires { b.device_ordinal(); }) {
        return b.device_ordinal();
    } else {
        return -1;
    }
}

} // namespace vmmpp
