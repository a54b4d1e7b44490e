// vmmpp/quota/detail/robust_mutex.hpp: a process-shared robust pthread mutex that lives in shared
// memory, seen through a Lockable handle (std::lock_guard, std::unique_lock, std::scoped_lock).
// When a process dies holding it, the next locker runs the handle's repair hook under the lock,
// before marking the mutex consistent: so whatever the dead owner left half-updated is mended
// before anyone else sees it, and a locker that dies while repairing leaves the repair to the next.
// The process budget keeps its lock in its segment's header and rebuilds its totals in the hook.
#pragma once

#include <pthread.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "vmmpp/error.hpp"

namespace vmmpp::detail {

/// Initialises `m` (in memory shared between processes, not yet a mutex) as a process-shared,
/// robust, default-type mutex. Returns 0, or the error number of the pthread call that failed.
/// Throws: nothing. Thread safety: once per mutex, before any process uses it.
inline int init_robust_mutex(pthread_mutex_t& m) noexcept {
    pthread_mutexattr_t attr;
    int rc = ::pthread_mutexattr_init(&attr);
    if (rc != 0) {
        return rc;
    }
    rc = ::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0) {
        rc = ::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    }
    if (rc == 0) {
        rc = ::pthread_mutex_init(&m, &attr);
    }
    ::pthread_mutexattr_destroy(&attr);
    return rc;
}

/// The repair hook of a robust_mutex whose state needs no repair.
struct no_repair {
    void operator()() const noexcept {}
};

/// A Lockable handle on a robust, process-shared pthread mutex that lives elsewhere (in a shared
/// mapping, initialised by init_robust_mutex); the handle is this process's, the mutex is shared.
///
/// When lock() or try_lock() finds that the last owner died holding the mutex (EOWNERDEAD), it
/// calls `on_owner_died()` with the lock held, then marks the mutex consistent, then returns as
/// from any other lock: the caller holds the lock and the state is mended. A process that dies
/// inside the hook leaves the mutex inconsistent, so the next locker repairs again. OnOwnerDied
/// must be callable without arguments and must not throw.
///
/// Thread safety: lock, try_lock and unlock may be called by any threads of any processes, as on
/// any mutex; the hook runs under the lock, so it is never called twice at once. The mutex must
/// outlive the handle.
template <class OnOwnerDied = no_repair>
class robust_mutex {
    static_assert(std::is_nothrow_invocable_v<OnOwnerDied&>, "a robust_mutex's repair hook must be noexcept");

public:
    /// A handle on `mutex`; `on_owner_died` is the repair hook; `label` names the mutex in the
    /// errors lock() throws (such as "vmmpp process budget '/name'").
    /// Throws: std::bad_alloc (copying the label).
    robust_mutex(pthread_mutex_t& mutex, OnOwnerDied on_owner_died, std::string label)
        : mutex_(&mutex), on_owner_died_(std::move(on_owner_died)), label_(std::move(label)) {}
    robust_mutex(const robust_mutex&) = delete;
    robust_mutex& operator=(const robust_mutex&) = delete;

    /// Blocks until this thread holds the mutex, repairing first if its last owner died.
    /// Throws: vmmpp::error if pthread_mutex_lock fails, or if the mutex cannot be made consistent
    /// (then it is not held).
    void lock() {
        if (const int rc = lock_or_error(); rc != 0) {
            throw error(label_ + ": pthread_mutex_lock failed: " + std::strerror(rc));
        }
    }

    /// lock() for callers that may not throw: returns 0 when the mutex is held, else the error
    /// number (and it is not held). Repairs as lock() does.
    /// Throws: nothing.
    [[nodiscard]] int lock_or_error() noexcept { return settle(::pthread_mutex_lock(mutex_)); }

    /// Takes the mutex if no one holds it, repairing first if its last owner died. Returns whether
    /// it is held now.
    /// Throws: vmmpp::error for an error other than EBUSY.
    [[nodiscard]] bool try_lock() {
        const int rc = settle(::pthread_mutex_trylock(mutex_));
        if (rc == EBUSY) {
            return false;
        }
        if (rc != 0) {
            throw error(label_ + ": pthread_mutex_trylock failed: " + std::strerror(rc));
        }
        return true;
    }

    /// Releases the mutex, which this thread holds.
    /// Throws: nothing.
    void unlock() noexcept { ::pthread_mutex_unlock(mutex_); }

    /// The shared mutex this handle locks.
    [[nodiscard]] pthread_mutex_t& native_handle() const noexcept { return *mutex_; }

private:
    /// Turns the result of a lock call into 0 (held, consistent) or an error (not held).
    int settle(int rc) noexcept {
        if (rc != EOWNERDEAD) {
            return rc;
        }
        on_owner_died_();  // held, with what the dead owner left: mend it before anyone sees it
        if (const int c = ::pthread_mutex_consistent(mutex_); c != 0) {
            ::pthread_mutex_unlock(mutex_);
            return c;
        }
        return 0;
    }

    pthread_mutex_t* mutex_;
    OnOwnerDied on_owner_died_;
    std::string label_;
};

} // namespace vmmpp::detail
