// vmmpp/quota/detail/futex.hpp: waiting on and waking a word of a mapping across processes.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>

namespace vmmpp::detail::pb {

/// Wakes every thread, of any process, sleeping in futex_wait on `word` (a word of the shared
/// mapping: no FUTEX_PRIVATE_FLAG, so the kernel keys it by the shared page, not the process).
/// Throws: nothing.
inline void futex_wake_all(std::atomic<std::uint32_t>& word) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

/// A futex_wait timeout that means no limit.
inline constexpr std::chrono::nanoseconds no_timeout = std::chrono::nanoseconds::max();

/// Sleeps while `word` still holds `seen`, until futex_wake_all on it, a signal, or `timeout`
/// (no_timeout: no limit). Returns at once if `word` changed already, so a change made after
/// `seen` was read is never slept through. Callers re-check what they wait for: wake-ups may be
/// spurious. (A plain duration, not an optional: GCC 12 at -O2 warns maybe-uninitialized on one.)
/// Throws: nothing.
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t seen, std::chrono::nanoseconds timeout) noexcept {
    const bool limited = timeout != no_timeout;
    const auto ns = std::max<std::chrono::nanoseconds::rep>(timeout.count(), 0);
    timespec ts{};
    ts.tv_sec = static_cast<std::time_t>(ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, seen, limited ? &ts : nullptr, nullptr, 0);
}

} // namespace vmmpp::detail::pb
