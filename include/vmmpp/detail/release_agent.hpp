// vmmpp/detail/release_agent.hpp: one thread per process that gives memory back when the GPU
// finishes the work a release waited for, so an engine that frees and then goes idle does not
// keep that memory until its next call (and the other models on the GPU can have it).
//
// The driver wakes it: a pool whose release left memory waiting for a fence queues a host
// function behind that fence on the fence's stream (cuLaunchHostFunc); when the GPU reaches it,
// the function (on a driver thread, where no CUDA call is allowed) only names the pool to the
// agent, and the agent's thread calls the pool's collect. One host function per stream is
// outstanding at a time (each stalls its stream for a moment): memory released behind a later
// fence on the same stream is polled for by the agent every poll_interval after the host
// function fired, only while such memory waits. The thread sleeps while nothing is pending.
//
// Lifetime: the agent is made on first use and never destroyed (host functions may still run
// while static destructors do); its thread starts with the first host function and ends with
// the process. A pool unregisters in its destructor, which waits for a call of it in progress.
// A child made by fork() starts with no thread; it starts again if the child queues a host
// function (CUDA itself is unusable in a child of a process that initialised it). If a context
// is torn down first, the pool's collect fails inside the call and the memory stays where it
// is; the agent goes on serving other pools.
#pragma once

#include <cuda.h>
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "vmmpp/driver/api.hpp"

namespace vmmpp::detail {

class release_agent {
public:
    /// What the agent calls for a client (a pool's collect), with the tag of the host function
    /// that fired (or no_tag when it polls); returns whether memory still waits for the GPU
    /// (then it is called again after poll_interval). Must not throw.
    using callback = std::function<bool(std::uint32_t tag)>;
    static constexpr std::uint32_t no_tag = 0xff;
    static constexpr std::chrono::microseconds poll_interval{1000};

    /// The process's agent.
    static release_agent& instance() {
        static release_agent* agent = make();  // never destroyed: see the file comment
        return *agent;
    }

    /// Registers `call`; returns the client's id (never 0).
    [[nodiscard]] std::uint64_t add(callback call) {
        auto shared = std::make_shared<const callback>(std::move(call));
        std::lock_guard lock(mutex_);
        const std::uint64_t id = ++last_id_;
        clients_.emplace(id, std::move(shared));
        return id;
    }
    /// Unregisters client `id`; if the agent is calling it now, waits until that call returns.
    /// The caller must not hold anything the callback takes (the pool's lock).
    void remove(std::uint64_t id) noexcept {
        std::unique_lock lock(mutex_);
        idle_.wait(lock, [&] { return running_ != id; });
        clients_.erase(id);
        polls_.erase(id);
    }

    /// Queues on `stream` a host function that asks the agent to call client `id` with `tag`
    /// (below no_tag) once the GPU has done the work queued there so far. Starts the agent's
    /// thread if needed. Throws: cuda_error (the current context must be the stream's),
    /// std::system_error.
    void call_when_reached(CUstream stream, std::uint64_t id, std::uint32_t tag) {
        start();
        const auto data = static_cast<std::uintptr_t>(id) << 8 | tag;
        driver::check(driver::get().launch_host_func(stream, &on_reached, reinterpret_cast<void*>(data)),
                      "cuLaunchHostFunc");
        ++host_functions_;
    }

    /// Asks the agent to call client `id` soon with `tag`, from any thread (no CUDA call).
    void request(std::uint64_t id, std::uint32_t tag) noexcept {
        {
            std::lock_guard lock(mutex_);
            try {
                requests_.push_back({id, tag});
            } catch (...) {
                call_all_ = true;  // out of memory: call every client rather than lose this one
            }
        }
        wake_.notify_one();
    }

    /// Host functions queued, and calls made (for tests and statistics).
    [[nodiscard]] std::uint64_t host_functions() const noexcept { return host_functions_.load(); }
    [[nodiscard]] std::uint64_t calls() const noexcept { return calls_.load(); }

private:
    release_agent() = default;
    static release_agent* make() {
        auto* agent = new release_agent;
        // The agent's mutex is not held across fork(), and the child has no agent thread.
        (void)::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                               [] {
                                   release_agent& a = instance();
                                   a.started_ = false;
                                   a.running_ = 0;
                                   a.requests_.clear();
                                   a.polls_.clear();
                                   a.mutex_.unlock();
                               });
        return agent;
    }

    /// The driver calls this on its own thread when the stream reaches it.
    static void CUDA_CB on_reached(void* data) {
        const auto bits = reinterpret_cast<std::uintptr_t>(data);
        instance().request(static_cast<std::uint64_t>(bits >> 8), static_cast<std::uint32_t>(bits & 0xff));
    }

    void start() {
        std::lock_guard lock(mutex_);
        if (started_) {
            return;
        }
        std::thread(&release_agent::run, this).detach();  // lives as long as the process
        started_ = true;
    }

    void run() noexcept {
        using clock = std::chrono::steady_clock;
        std::unique_lock lock(mutex_);
        for (;;) {
            const auto ready = [&] { return !requests_.empty() || call_all_; };
            if (polls_.empty()) {
                wake_.wait(lock, ready);
            } else {
                const auto next = std::min_element(polls_.begin(), polls_.end(), [](const auto& a, const auto& b) {
                                      return a.second < b.second;
                                  })->second;
                (void)wake_.wait_until(lock, next, ready);
            }
            std::vector<std::pair<std::uint64_t, std::uint32_t>> calls;
            calls.swap(requests_);
            const auto now = clock::now();
            const bool everyone = std::exchange(call_all_, false);
            for (auto it = polls_.begin(); it != polls_.end();) {  // polls that are due
                if (it->second > now && !everyone) {
                    ++it;
                    continue;
                }
                try {
                    calls.push_back({it->first, no_tag});
                } catch (...) {
                    break;  // the rest stay due
                }
                it = polls_.erase(it);
            }
            if (everyone) {
                for (const auto& [id, call] : clients_) {
                    try {
                        calls.push_back({id, no_tag});
                    } catch (...) {
                        break;
                    }
                }
            }
            for (const auto& [id, tag] : calls) {
                const auto it = clients_.find(id);
                if (it == clients_.end()) {
                    continue;  // removed meanwhile
                }
                const std::shared_ptr<const callback> call = it->second;
                running_ = id;
                lock.unlock();
                const bool again = (*call)(tag);
                ++calls_;
                lock.lock();
                running_ = 0;
                idle_.notify_all();
                if (again && clients_.contains(id)) {
                    try {
                        polls_[id] = clock::now() + poll_interval;
                    } catch (...) {
                        // out of memory: the memory goes back on the engine's next call
                    }
                }
            }
        }
    }

    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable idle_;
    std::map<std::uint64_t, std::shared_ptr<const callback>> clients_;
    std::vector<std::pair<std::uint64_t, std::uint32_t>> requests_;  // (client, tag) to call now
    std::map<std::uint64_t, std::chrono::steady_clock::time_point> polls_;  // clients to call again, and when
    bool call_all_ = false;
    bool started_ = false;
    std::uint64_t running_ = 0;
    std::uint64_t last_id_ = 0;
    std::atomic<std::uint64_t> host_functions_{0};
    std::atomic<std::uint64_t> calls_{0};
};

} // namespace vmmpp::detail
