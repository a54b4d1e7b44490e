// vmmpp/pool/mapper_agent.hpp: the agent of a pool whose growth policy maps ahead
// (mapped_ahead; the seam: vmmpp/pool/agent.hpp). Its thread commits spare units ahead of
// demand and gives idle ones back lazily, as its plan decides (vmmpp/growth/mapper.hpp), through
// the pool's commit and decommit paths with the pool's lock released around the driver calls: a
// unit it maps or unmaps is "in flight", and a caller that needs it waits for it.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <optional>
#include <span>
#include <thread>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/adaptive_mutex.hpp"
#include "vmmpp/detail/unit_table.hpp"
#include "vmmpp/growth/mapper.hpp"
#include "vmmpp/pool_config.hpp"

namespace vmmpp::detail {

/// Books: the pool's detail::pool_books.
template <class Books>
class mapper_agent {
public:
    using mutex_type = typename Books::mutex_type;
    using clock = typename Books::clock;
    static constexpr bool calls_backing_unlocked = true;

    explicit mapper_agent(Books& books) : books_(books), plan_(books.growth, books.units) {}
    mapper_agent(const mapper_agent&) = delete;
    mapper_agent& operator=(const mapper_agent&) = delete;

    /// Starts the thread: once everything it reads exists.
    void start() { thread_ = std::thread([this] { run(); }); }
    /// Asks the thread to stop (it finishes the unit in flight) and joins it. Without the lock.
    void stop() noexcept {
        {
            std::lock_guard lock(books_.mutex);
            stopping_ = true;
        }
        wake_.notify_all();
        if (thread_.joinable()) {
            thread_.join();
        }
    }

    /// A caller took unit u: the plan learns where demand goes. A polling mapper finds a refill
    /// by itself; waking one costs this (critical) path a system call, so only a mapper asleep
    /// for good is woken.
    void on_taken(std::size_t u) {
        if (plan_.on_taken(books_.table, u, clock::now()) && waiting_) {
            wake_.notify_one();
        }
    }
    void on_idle(std::size_t u) { plan_.on_idle(books_.table, u, clock::now()); }
    /// The spares were elsewhere: map ahead of this demand.
    void on_missed() noexcept {
        plan_.on_missed();
        if (waiting_) {
            wake_.notify_one();
        }
    }
    /// Releases keep every spare (mapped_ahead's idle_units_to_keep): a mapper asleep without a
    /// timer is woken to schedule the lazy release of those above the high watermark.
    void after_release(std::span<const pool_fence>) noexcept {
        if (books_.table.idle.size() > plan_.high_watermark() && waiting_ && !has_deadline_) {
            wake_.notify_one();
        }
    }
    void will_need(std::size_t first, std::size_t last) {
        plan_.will_need(first, last);
        wake_.notify_one();
    }
    void stop_refilling() noexcept { plan_.stop_refilling(); }
    void commit_started(std::size_t n) noexcept { plan_.commit_started(n); }
    void commit_finished(std::size_t n) noexcept { plan_.commit_finished(n); }
    /// The mapper is mapping or unmapping a unit the caller needs: never map twice.
    void wait_for_in_flight(std::unique_lock<mutex_type>& lock) { settled_.wait(lock); }

    /// The plan, for tests and statistics (the pool's lock held).
    [[nodiscard]] const mapper_plan<clock>& plan() const noexcept { return plan_; }

private:
    void run() {
        if constexpr (context_binding_backing<typename Books::backing_type>) {
            try {
                books_.backing.bind_current_thread();
            } catch (...) {
                // each backing call then pushes and pops the context itself
            }
        }
        std::unique_lock lock(books_.mutex);
        while (!stopping_) {
            if (map_next(lock) || release_next(lock)) {
                settled_.notify_all();
                continue;
            }
            sleep(lock);
        }
    }

    /// Maps the next unit the plan wants, as an extent the sizer sizes; false if none is wanted.
    bool map_next(std::unique_lock<mutex_type>& lock) {
        const auto u = plan_.next_to_map(books_.table);
        if (!u) {
            return false;
        }
        const auto started = clock::now();
        const std::size_t want = books_.sizer.size_at(started);
        std::size_t n = 1;
        while (n < want && *u + n < books_.units && books_.table.state[*u + n] == unit_state::uncommitted) {
            ++n;
        }
        try {
            (void)books_.commit(*u, n, 0, {.make_room = false}, &lock);  // spares never push other memory out
            ++books_.stats.mapper_commits;
            books_.sizer.committed(started);
            for (std::size_t a = *u; a < *u + n; ++a) {
                books_.make_idle(a);
            }
        } catch (...) {
            ++books_.stats.mapper_failures;  // over quota or out of memory: stop refilling until demand comes back
            plan_.stop_refilling();
        }
        return true;
    }

    /// Gives back the spare the plan says is due (idle long enough, its GPU work done); false if none.
    bool release_next(std::unique_lock<mutex_type>& lock) {
        const auto gpu_done = [this](std::size_t unit) {
            const std::size_t first = books_.table.extent_first[unit];
            if (!books_.gpu_done_with_extent(first)) {
                try {
                    books_.poll_fences();
                } catch (...) {
                    // a lost context: the unit stays a spare
                }
            }
            return books_.gpu_done_with_extent(first);
        };
        deadline_.reset();
        const auto u = plan_.next_to_release(books_.table, clock::now(), deadline_, gpu_done);
        if (!u) {
            return false;
        }
        const std::size_t first = books_.table.extent_first[*u];
        if (!books_.table.idle_extents.contains(first)) {
            return true;  // part of its extent is held: it goes back with the last of them
        }
        books_.forget_extent_idle(first);
        try {
            (void)books_.decommit(first, &lock);
            ++books_.stats.mapper_decommits;
        } catch (...) {
            ++books_.stats.mapper_failures;  // a spare again or retired (decommit settled it)
        }
        return true;
    }

    /// Nothing to do now. Growing lately: poll without the lock (callers never meet the mapper
    /// on it and never wake it), until a refill is wanted, a release is due, or a while passed.
    /// Quiet: sleep until woken (demand, shutdown) or the next lazy release is due.
    void sleep(std::unique_lock<mutex_type>& lock) {
        const auto now = clock::now();
        if (plan_.growing(now)) {
            const auto look_again = std::min(deadline_.value_or(clock::time_point::max()), now + plan_.release_delay());
            lock.unlock();
            do {
                std::this_thread::sleep_for(books_.growth.poll_interval);
            } while (!stopping_.load(std::memory_order_relaxed) && !plan_.refilling() && clock::now() < look_again);
            lock_spinning(lock);
            return;
        }
        waiting_ = true;
        has_deadline_ = deadline_.has_value();
        if (deadline_) {
            wake_.wait_until(lock, *deadline_);
        } else {
            wake_.wait(lock);
        }
        waiting_ = false;
    }

    Books& books_;
    mapper_plan<clock> plan_;
    std::thread thread_;
    std::condition_variable_any wake_;     // wakes the mapper (demand, shutdown)
    std::condition_variable_any settled_;  // a unit in flight settled (callers waiting for it)
    std::atomic<bool> stopping_{false};
    bool waiting_ = false;       // asleep on wake_ (the pool's lock released)
    bool has_deadline_ = false;  // ... with a timer
    std::optional<typename clock::time_point> deadline_;  // when a due release is next looked at
};

} // namespace vmmpp::detail
