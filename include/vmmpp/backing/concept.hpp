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
/// Property: host memory the driver has page-locked (pinned): copies between it and a GPU are
/// DMA, asynchronous, and may go in one batch (cudaMemcpyBatchAsync).
struct page_locked {};

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

// Optional capabilities. A pool (and an adaptor, which forwards them: detail::backing_adaptor)
// asks for each by name, so one a backing has is never lost on the way.

/// A backing that keeps physical memory after decommit for a later commit to reuse (vmm with
/// vmm_options::max_cached_handles): `cached_bytes()` says how much it keeps, which still
/// occupies the device, so a pool charges it to its quota; `release_cached()` gives it all back
/// and returns the bytes released.
template <class B>
concept handle_keeping_backing = backing<B> && requires(B& b, const B& cb) {
    { cb.cached_bytes() } -> std::same_as<std::size_t>;
    { b.release_cached() } -> std::same_as<std::size_t>;
};

/// A backing whose driver calls need a context current: `bind_current_thread()` makes it current
/// on the calling thread for good (a pool's mapper thread calls it once, then skips the push and
/// pop on every commit).
template <class B>
concept context_binding_backing = backing<B> && requires(const B& cb) { cb.bind_current_thread(); };

/// A backing that can hand its committed physical memory to another process: `export_handles()`
/// returns one POSIX file descriptor per physical handle (vmmpp/interop/shared_pages.hpp).
template <class B>
concept handle_exporting_backing = backing<B> && requires(const B& cb) { cb.export_handles(); };

/// The CUDA device a backing's memory lives on, or -1 for host memory.
template <backing B>
[[nodiscard]] int device_of(const B& b) noexcept {
    if constexpr (requires { b.device_ordinal(); }) {
        return b.device_ordinal();
    } else {
        return -1;
    }
}

/// Bytes of decommitted physical memory a backing keeps for reuse (0 for one that keeps none).
template <backing B>
[[nodiscard]] std::size_t kept_bytes_of(const B& b) noexcept {
    if constexpr (handle_keeping_backing<B>) {
        return b.cached_bytes();
    } else {
        return 0;
    }
}

/// Releases what a backing keeps for reuse; returns the bytes released (0 for one that keeps none).
template <backing B>
std::size_t release_kept(B& b) noexcept {
    if constexpr (handle_keeping_backing<B>) {
        return b.release_cached();
    } else {
        return 0;
    }
}

} // namespace vmmpp
