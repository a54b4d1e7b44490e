// vmmpp/quota/detail/futex_watcher.hpp: a thread calling a tick whenever a futex word changes.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <thread>
#include <utility>

#include "vmmpp/quota/detail/futex.hpp"

namespace vmmpp::detail::pb {

/// A watcher thread on one word of a shared mapping (a segment's wake_word): it sleeps there
/// (FUTEX_WAIT, no CPU while nothing happens) and calls `tick` whenever the word changes, and
/// also every `every` if that is not zero. Only the process that started it stops and joins it:
/// a forked child's copy of the handle names a thread that lives in the parent only, and is left
/// alone.
/// Thread safety: start() and running_here() are the owner's to serialise (segment calls them
/// under its local registry's mutex); stop() runs from the owner's destructor.
class futex_watcher {
public:
    futex_watcher() noexcept = default;
    futex_watcher(const futex_watcher&) = delete;
    futex_watcher& operator=(const futex_watcher&) = delete;
    /// stop().
    ~futex_watcher() { stop(); }

    /// Starts the thread on `word` (which must outlive it), unless one was started already: then
    /// it does nothing and returns false.
    /// Throws: std::system_error if no thread can be started.
    bool start(std::atomic<std::uint32_t>& word, std::chrono::milliseconds every, std::function<void()> tick) {
        if (thread_.joinable()) {
            return false;
        }
        thread_ = std::thread([this, &word, every, tick = std::move(tick)] {
            const std::chrono::nanoseconds timeout = every.count() > 0 ? std::chrono::nanoseconds(every) : no_timeout;
            for (;;) {
                // Read the word before acting: a change made while `tick` runs makes the wait
                // return at once.
                const std::uint32_t seen = word.load();
                if (stop_.load()) {
                    return;
                }
                tick();
                futex_wait(word, seen, timeout);
            }
        });
        word_ = &word;
        pid_ = ::getpid();
        return true;
    }

    /// Whether the thread was started by, and so runs in, the calling process.
    [[nodiscard]] bool running_here() const noexcept { return thread_.joinable() && pid_ == ::getpid(); }

    /// Stops and joins the thread, if this process started it (in a forked child, detaches the
    /// copied handle). Later calls do nothing.
    /// Throws: nothing.
    void stop() noexcept {
        if (!thread_.joinable()) {
            return;
        }
        if (pid_ != ::getpid()) {
            thread_.detach();
            return;
        }
        // Stop first, then change the word: the thread either sees the stop before it sleeps or
        // finds the word changed and does not sleep (or is woken). Other processes' watchers on
        // the same word wake once too, find nothing asked and sleep again.
        stop_.store(true);
        word_->fetch_add(1);
        futex_wake_all(*word_);
        thread_.join();
    }

private:
    std::atomic<bool> stop_{false};
    std::atomic<std::uint32_t>* word_ = nullptr;
    pid_t pid_ = 0;       // the process that started thread_ (fork: not the child)
    std::thread thread_;  // last: started after, and joined before, the members above go
};

} // namespace vmmpp::detail::pb
