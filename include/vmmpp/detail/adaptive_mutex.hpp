// vmmpp/detail/adaptive_mutex.hpp: the mutexes a pool may serialise on: null_mutex (a pool used
// from one thread) and adaptive_mutex (the default: spins briefly, then sleeps), and the
// spinning lock its background threads take.
#pragma once

#include <chrono>
#include <mutex>

namespace vmmpp {

/// A mutex that does nothing, for pools only ever used from one thread.
struct null_mutex {
    void lock() noexcept {}
    void unlock() noexcept {}
    bool try_lock() noexcept { return true; }
};

/// A std::mutex that spins for up to a few microseconds before it sleeps. The pool's critical
/// sections are bookkeeping (about a microsecond), and a thread put to sleep on a mutex takes
/// several microseconds to wake: an append that meets the mapper publishing a page should spin,
/// not sleep. Spinning stops after ~10 us, so a caller waiting behind a driver call sleeps.
class adaptive_mutex {
public:
    void lock() {
        if (mutex_.try_lock()) {
            return;
        }
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(10);
        for (unsigned i = 1;; ++i) {
            cpu_relax();
            if (mutex_.try_lock()) {
                return;
            }
            if (i % 64 == 0 && std::chrono::steady_clock::now() > give_up) {
                break;
            }
        }
        mutex_.lock();
    }
    void unlock() { mutex_.unlock(); }
    bool try_lock() { return mutex_.try_lock(); }

    /// A pause for spin-wait loops.
    static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        asm volatile("yield");
#endif
    }

private:
    std::mutex mutex_;
};

namespace detail {

/// Takes `lock` by spinning on try_lock for up to 50 us, then asleep. For a pool's background
/// threads: a thread blocked on a mutex makes its owner's unlock a system call, and the owner is
/// usually a caller on its critical path, done in about a microsecond; a holder that keeps it
/// longer (synchronize, with_backing, a quota's reclaim) is waited for asleep, not at 100 % of a core.
template <class Lock>
void lock_spinning(Lock& lock) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    for (unsigned i = 1; !lock.try_lock(); ++i) {
        adaptive_mutex::cpu_relax();
        if (i % 64 == 0 && std::chrono::steady_clock::now() > give_up) {
            lock.lock();
            return;
        }
    }
}

} // namespace detail
} // namespace vmmpp
