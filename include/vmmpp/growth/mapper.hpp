// vmmpp/growth/mapper.hpp: what the background mapper of a pool whose growth policy maps ahead
// (mapped_ahead) decides: mapper_plan, which unit to map next and which spare to give back when.
// The decisions take the time as an argument, so tests drive them with a clock of their own and
// never sleep; the mapper's thread acts on them (vmmpp/pool/mapper_agent.hpp). A pool without
// a mapper holds none of this.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/detail/unit_table.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/growth/mapped_ahead.hpp"

namespace vmmpp::detail {

/// The background mapper's decisions over a pool's unit_table, for a policy that models
/// background_growth_policy. It predicts demand from where units were taken last (the unit after
/// a taken one is where a lowest-first allocator goes next) and from will_need hints, refills
/// spares from below the low watermark up to the high one, and gives spares above the high
/// watermark back oldest first once idle for release_delay and free of queued GPU work.
///
/// Thread safety: none; the pool calls it under its lock, except refilling(), which the mapper's
/// polling loop reads without it.
template <class Clock = std::chrono::steady_clock>
class mapper_plan {
public:
    using clock = Clock;
    using time_point = typename Clock::time_point;

    /// How far the mapper looks past a frontier, at most, per search (it runs under the lock).
    static constexpr std::size_t max_scan = 4096;
    /// Frontiers remembered (the newest first).
    static constexpr std::size_t max_frontiers = 256;
    /// How soon the mapper looks again at a due spare whose GPU work was still queued.
    static constexpr std::chrono::milliseconds fence_poll_interval{1};

    /// Decisions for `units` units with `growth`'s watermarks and delay. Throws invalid_argument
    /// when low_watermark exceeds high_watermark or poll_interval is not positive. Watermarks
    /// above the unit count are clamped to it: "never give spares back" (SIZE_MAX) means all.
    template <background_growth_policy Growth>
    mapper_plan(const Growth& growth, std::size_t units)
        : low_(growth.low_watermark), high_(growth.high_watermark), release_delay_(growth.release_delay),
          idle_since_(units) {
        if (low_ > high_) {
            throw invalid_argument("mapped_ahead: low_watermark " + std::to_string(low_) + " exceeds high_watermark " +
                                   std::to_string(high_));
        }
        if (growth.poll_interval.count() <= 0) {
            throw invalid_argument("mapped_ahead: poll_interval must be positive (" +
                                   std::to_string(growth.poll_interval.count()) + " us would make the mapper spin)");
        }
        high_ = std::min(high_, units);
        low_ = std::min(low_, high_);
    }

    [[nodiscard]] std::size_t low_watermark() const noexcept { return low_; }
    [[nodiscard]] std::size_t high_watermark() const noexcept { return high_; }

    // --- events (the caller holds the pool's lock) ---

    /// A caller took unit `u` (its first page became held) at `now`; `t.idle` no longer has it.
    /// Returns true when this starts a refill (then a mapper asleep for good must be woken).
    bool on_taken(const unit_table& t, std::size_t u, time_point now) {
        if (u + 1 < t.size()) {
            auto it = std::find(frontiers_.begin(), frontiers_.end(), u);
            if (it != frontiers_.end()) {
                *it = u + 1;  // that frontier advanced
            } else {
                add_frontier(u + 1);
            }
        }
        last_taken_ = now;
        if (!refilling_ && t.idle.size() + in_flight_commits_ < low_) {
            refilling_ = true;
            return true;
        }
        return false;
    }

    /// Unit `u` became idle at `now` (it is in `t.idle` already).
    void on_idle(const unit_table& t, std::size_t u, time_point now) {
        idle_since_[u] = now;
        idle_order_.emplace_back(u, now);
        if (idle_order_.size() > 2 * t.idle.size() + 64) {
            std::erase_if(idle_order_, [&](const auto& e) { return !is_idle_since(t, e.first, e.second); });
        }
    }

    /// Units [first, last] will be needed soon: map them (and the ones after them) into spares.
    void will_need(std::size_t first, std::size_t last) {
        for (std::size_t u = first; u <= last; ++u) {
            add_frontier(u);
        }
        refilling_ = true;
    }

    /// A caller had to commit memory itself: the spares were not where demand went (say, after
    /// the cache emptied and its allocator started again at the bottom, while the spares kept
    /// sit where it stopped). Map up to high_watermark units ahead of the newest frontier
    /// whatever the spare count; the misplaced spares, now above the high watermark, go back
    /// after release_delay.
    void on_missed() noexcept {
        missed_budget_ = high_;
        refilling_ = true;
    }

    /// Stop refilling until demand comes back (the pool gave its spares back, or a map failed).
    void stop_refilling() noexcept {
        refilling_ = false;
        missed_budget_ = 0;
    }
    /// Whether a refill is wanted; read without the lock by a polling mapper.
    [[nodiscard]] bool refilling() const noexcept { return refilling_.load(std::memory_order_relaxed); }

    /// The mapper started mapping `units` units (they are `committing`), and finished (either way).
    void commit_started(std::size_t units = 1) noexcept { in_flight_commits_ += units; }
    void commit_finished(std::size_t units = 1) noexcept { in_flight_commits_ -= units; }

    /// Whether callers took units within the last release_delay (the pool is growing).
    [[nodiscard]] bool growing(time_point now) const noexcept { return now - last_taken_ < release_delay_; }
    [[nodiscard]] std::chrono::milliseconds release_delay() const noexcept { return release_delay_; }

    // --- decisions ---

    /// The next uncommitted unit to map ahead of demand, or none (then refilling stops until
    /// demand returns). Breadth first over the frontiers, newest first, within high_watermark
    /// units past each, and at most max_scan looks.
    [[nodiscard]] std::optional<std::size_t> next_to_map(const unit_table& t) {
        if (!refilling_) {
            return std::nullopt;
        }
        if (missed_budget_ == 0 && t.idle.size() + in_flight_commits_ >= high_) {
            refilling_ = false;
            return std::nullopt;
        }
        std::size_t looks = 0;
        for (std::size_t d = 0; d < high_ && looks < max_scan; ++d) {
            bool any_left = false;
            for (std::size_t f : frontiers_) {
                if (f + d >= t.size()) {
                    continue;
                }
                any_left = true;
                if (t.state[f + d] == unit_state::uncommitted) {
                    missed_budget_ -= missed_budget_ > 0 ? 1 : 0;
                    return f + d;
                }
                if (++looks == max_scan) {
                    break;
                }
            }
            if (!any_left) {
                break;
            }
        }
        refilling_ = false;  // nothing predicted: wait for demand
        missed_budget_ = 0;
        return std::nullopt;
    }

    /// The oldest spare above the high watermark that has been idle for release_delay and whose
    /// GPU work is done (`gpu_done(u)`, which may ask the driver), or none; `deadline` becomes
    /// when to look again (the next spare due, or soon if the GPU still works on one).
    template <class GpuDone>
    [[nodiscard]] std::optional<std::size_t> next_to_release(const unit_table& t, time_point now,
                                                             std::optional<time_point>& deadline, GpuDone&& gpu_done) {
        if (t.idle.size() <= high_) {
            return std::nullopt;
        }
        while (!idle_order_.empty()) {
            const auto [u, since] = idle_order_.front();
            if (!is_idle_since(t, u, since)) {
                idle_order_.pop_front();  // taken again since, or already given back
                continue;
            }
            if (since + release_delay_ > now) {
                deadline = since + release_delay_;
                return std::nullopt;
            }
            if (!gpu_done(u)) {
                deadline = now + fence_poll_interval;
                return std::nullopt;
            }
            idle_order_.pop_front();
            return u;
        }
        return std::nullopt;
    }

private:
    [[nodiscard]] bool is_idle_since(const unit_table& t, std::size_t u, time_point since) const noexcept {
        return t.is_idle(u) && idle_since_[u] == since;
    }
    void add_frontier(std::size_t u) {
        if (std::find(frontiers_.begin(), frontiers_.end(), u) != frontiers_.end()) {
            return;
        }
        if (frontiers_.size() == max_frontiers) {
            frontiers_.pop_back();
        }
        frontiers_.push_front(u);
    }

    std::size_t low_;
    std::size_t high_;
    std::chrono::milliseconds release_delay_;
    std::atomic<bool> refilling_{false};
    std::size_t in_flight_commits_ = 0;
    std::size_t missed_budget_ = 0;  // units still to map past the watermark check after a miss
    time_point last_taken_{};
    std::deque<std::size_t> frontiers_;                       // units expected next, newest first
    std::vector<time_point> idle_since_;                      // per unit: when it last became idle
    std::deque<std::pair<std::size_t, time_point>> idle_order_;  // idle units, oldest first (lazily pruned)
};

} // namespace vmmpp::detail
