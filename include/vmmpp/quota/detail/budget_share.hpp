// vmmpp/quota/detail/budget_share.hpp: one process's share of one model in a budget segment.
//
// acquire (asking other processes to give back when a limit refuses), release, spares, stats.
// Each operation is one critical section under the segment's robust lock; every store is ordered
// so that the lock's repair (segment::repair) can rebuild the totals from the usage records after
// a process dies half way. vmmpp::process_quota and vmmpp::process_budget are thin layers over
// these parts. Linux only.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/futex.hpp"
#include "vmmpp/quota/detail/model_admin.hpp"  // stats_of_locked
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/reclaim_dead.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"
#include "vmmpp/quota/shared_budget.hpp"  // model_stats

namespace vmmpp::detail::pb {

/// One process's share of one model in a segment: its model slot and usage record, the process
/// (image) it is charged to, and the model's name. Copies charge the same record.
///
/// Nothing here checks which process calls: a share acts for `who()` wherever it is used
/// (vmmpp::process_quota adds that check; tests use shares to act for made-up processes).
/// Thread safety: every member function may be called at once from any threads of any processes;
/// each is one critical section of the segment's lock.
class share {
public:
    /// The share of `who` in model slot `model`, record slot `record` of `s`, for model `name`.
    share(std::shared_ptr<const segment> s, std::uint32_t model, std::uint32_t record, process_identity who,
          std::string name) noexcept
        : segment_(std::move(s)), model_(model), record_(record), who_(who), name_(std::move(name)) {}

    /// Takes `bytes` from this model's limit and the global limit together. Before refusing, it
    /// takes back the shares of dead processes and tries once more; then, if `wait` is not zero
    /// and other live processes whose watchers serve requests hold enough of the limit that
    /// refused, it posts a reclaim request (their watchers give their spares back) and retries
    /// as they answer, until it succeeds, every process asked has answered, or `wait` has passed.
    /// `count_denial` false: a refusal is not counted in the denied counters (the caller's
    /// previous acquire of the same bytes was, just before).
    /// Throws: vmmpp::over_quota naming the limit that refused ("model <name>" or "global"), with
    /// nothing changed but the denied counters; vmmpp::error if the record was freed (its process
    /// was taken for dead) or the lock cannot be taken.
    void acquire(std::size_t bytes, std::chrono::milliseconds wait = std::chrono::milliseconds(0),
                 bool count_denial = true) const {
        const segment& s = *segment_;
        header& h = s.head();
        bool dead_reclaimed = false;
        request asked;
        // Withdraws this thread's request on every way out (a success, a refusal, an error).
        struct withdraw {
            const share& self;
            request& asked;
            ~withdraw() {
                if (asked.ticket != 0 && self.segment_->mutex().lock_or_error() == 0) {
                    std::lock_guard lock(self.segment_->mutex(), std::adopt_lock);
                    self.withdraw_locked(asked);
                }
            }
        } withdraw_on_exit{*this, asked};
        const auto deadline = std::chrono::steady_clock::now() + wait;
        for (;;) {
            const std::uint32_t answers_seen = h.answer_word.load();  // before looking: no answer is slept through
            bool post = false;
            {
                std::lock_guard lock(s.mutex());
                model_slot& m = s.models()[model_];
                record_slot& r = s.records()[record_];
                if (!owns(r, who_, model_)) {
                    throw error("vmmpp process budget '" + s.name() + "': the usage record of model '" + name_ +
                                "' in this process was freed (was this process taken for dead?)");
                }
                const std::uint64_t model_left = m.limit > m.committed ? m.limit - m.committed : 0;
                const std::uint64_t global_left = h.limit > h.committed ? h.limit - h.committed : 0;
                if (bytes <= model_left && bytes <= global_left) {
                    r.bytes += bytes;  // the record first: repair() rebuilds the rest from it
                    ordered();
                    m.committed += bytes;
                    m.peak = std::max(m.peak, m.committed);
                    h.committed += bytes;
                    h.peak = std::max(h.peak, h.committed);
                    if (asked.ticket != 0) {
                        ++h.request_grants;
                        withdraw_locked(asked);
                    }
                    return;
                }
                if (dead_reclaimed) {
                    const bool model_refused = bytes > model_left;
                    const bool global_refused = bytes > global_left;
                    if (asked.ticket == 0) {
                        post = wait.count() > 0 && post_locked(asked, bytes, model_left, global_left, model_refused,
                                                               global_refused);
                    }
                    if (!post && (asked.ticket == 0 || answered_locked(asked) ||
                                  std::chrono::steady_clock::now() >= deadline)) {
                        m.denied += count_denial ? 1 : 0;
                        h.denied += count_denial ? 1 : 0;
                        withdraw_locked(asked);
                        if (model_refused) {
                            throw over_quota("model " + name_, bytes, m.committed, m.limit);
                        }
                        throw over_quota("global", bytes, h.committed, h.limit);
                    }
                }
            }
            if (!dead_reclaimed) {
                reclaim_dead(s);
                dead_reclaimed = true;
                continue;
            }
            if (post) {
                futex_wake_all(h.wake_word);
            }
            futex_wait(h.answer_word, answers_seen, deadline - std::chrono::steady_clock::now());
        }
    }

    /// Gives `bytes` back to both limits (at most what the record holds). Does nothing if the
    /// record was freed or the lock cannot be taken.
    /// Throws: nothing.
    void release(std::size_t bytes) const noexcept {
        const segment& s = *segment_;
        if (s.mutex().lock_or_error() != 0) {
            return;
        }
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        header& h = s.head();
        model_slot& m = s.models()[model_];
        record_slot& r = s.records()[record_];
        if (owns(r, who_, model_)) {
            const std::uint64_t n = std::min<std::uint64_t>(bytes, r.bytes);  // never underflow on misuse
            r.bytes -= n;
            ordered();
            m.committed -= std::min(n, m.committed);
            h.committed -= std::min(n, h.committed);
        }
    }

    /// This model's statistics now, over every process.
    /// Throws: vmmpp::error if the lock cannot be taken; std::bad_alloc.
    [[nodiscard]] model_stats stats() const {
        std::lock_guard lock(segment_->mutex());
        return stats_of_locked(*segment_, model_);
    }

    /// Sets the spare bytes this process's pools of the model last reported (the record's).
    /// Does nothing if the record was freed or the lock cannot be taken.
    /// Throws: nothing.
    void report_spares(std::size_t bytes) const noexcept {
        const segment& s = *segment_;
        if (s.mutex().lock_or_error() != 0) {
            return;
        }
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        record_slot& r = s.records()[record_];
        if (owns(r, who_, model_)) {
            r.spares = bytes;
        }
    }

    /// The bytes this model could still take under its own limit and under the global limit
    /// ({0, 0} if the lock cannot be taken).
    /// Throws: nothing.
    [[nodiscard]] std::pair<std::size_t, std::size_t> room() const noexcept {
        const segment& s = *segment_;
        if (s.mutex().lock_or_error() != 0) {
            return {0, 0};
        }
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        const header& h = s.head();
        const model_slot& m = s.models()[model_];
        return {static_cast<std::size_t>(m.limit > m.committed ? m.limit - m.committed : 0),
                static_cast<std::size_t>(h.limit > h.committed ? h.limit - h.committed : 0)};
    }

    /// The segment.
    [[nodiscard]] const segment& seg() const noexcept { return *segment_; }

    /// The bytes the record holds now (0 once it was freed).
    /// Throws: vmmpp::error if the lock cannot be taken.
    [[nodiscard]] std::size_t process_committed() const {
        std::lock_guard lock(segment_->mutex());
        const record_slot& r = segment_->records()[record_];
        return owns(r, who_, model_) ? r.bytes : 0;
    }

    /// The model's slot index.
    [[nodiscard]] std::uint32_t model() const noexcept { return model_; }
    /// The usage record's slot index.
    [[nodiscard]] std::uint32_t record() const noexcept { return record_; }
    /// The process the share is charged to.
    [[nodiscard]] const process_identity& who() const noexcept { return who_; }
    /// The model's name.
    [[nodiscard]] const std::string& name() const noexcept { return name_; }

private:
    /// A reclaim request this thread posted: its ticket (0: none), which limits it waits under,
    /// and the records of the processes asked.
    struct request {
        std::uint64_t ticket = 0;
        bool model = false;
        bool global = false;
        std::vector<std::pair<std::uint32_t, process_identity>> asked;
    };

    /// Posts a request when the other live processes whose watchers serve requests hold enough
    /// of each refusing limit to make room: marks this record asking, takes a ticket and bumps
    /// wake_word (the caller wakes the watchers after unlocking). Returns whether it posted.
    /// Called with the lock held.
    /// Throws: std::bad_alloc (nothing posted).
    bool post_locked(request& q, std::size_t bytes, std::uint64_t model_left, std::uint64_t global_left,
                     bool model_refused, bool global_refused) const {
        const segment& s = *segment_;
        const record_slot* r = s.records();
        std::uint64_t model_held = 0;   // what others hold of this model: the most they could give back
        std::uint64_t global_held = 0;  // ... of any model
        std::vector<std::pair<std::uint32_t, process_identity>> asked;
        for (std::uint32_t k = 0; k < s.max_records(); ++k) {
            if (r[k].pid == 0 || r[k].watching == 0 || r[k].bytes == 0 || identity_of(r[k]) == who_) {
                continue;
            }
            const bool same_model = r[k].model == model_;
            if ((model_refused && same_model) || global_refused) {
                asked.emplace_back(k, identity_of(r[k]));
            }
            model_held += same_model ? r[k].bytes : 0;
            global_held += r[k].bytes;
        }
        if (asked.empty() || (model_refused && bytes > model_left + model_held) ||
            (global_refused && bytes > global_left + global_held)) {
            return false;  // nobody could make room: refuse now rather than after the wait
        }
        header& h = s.head();
        record_slot& mine = s.records()[record_];
        q.asked = std::move(asked);
        q.model = model_refused;
        q.global = global_refused;
        mine.asking_model += model_refused ? 1 : 0;
        const std::size_t pages = bytes / asking_page_bytes + (bytes % asking_page_bytes != 0 ? 1 : 0);
        mine.asking_pages = std::max<std::uint32_t>(
            mine.asking_pages, static_cast<std::uint32_t>(std::min<std::size_t>(pages, UINT32_MAX)));
        mine.asking_global += global_refused ? 1 : 0;
        q.ticket = ++h.requests;
        h.wake_word.fetch_add(1);
        return true;
    }

    /// Whether every process asked has answered the request (or is gone). Lock held.
    /// Throws: nothing.
    bool answered_locked(const request& q) const noexcept {
        const record_slot* r = segment_->records();
        for (const auto& [k, id] : q.asked) {
            if (r[k].pid != 0 && identity_of(r[k]) == id && r[k].answered < q.ticket) {
                return false;
            }
        }
        return true;
    }

    /// Takes this thread's request back: the record no longer asks for it. Lock held.
    /// Throws: nothing.
    void withdraw_locked(request& q) const noexcept {
        record_slot& mine = segment_->records()[record_];
        if (owns(mine, who_, model_)) {
            mine.asking_model -= q.model && mine.asking_model > 0 ? 1 : 0;
            mine.asking_global -= q.global && mine.asking_global > 0 ? 1 : 0;
            if (mine.asking_model == 0 && mine.asking_global == 0) {
                mine.asking_pages = 0;
            }
        }
        q.ticket = 0;
    }

    std::shared_ptr<const segment> segment_;
    std::uint32_t model_;
    std::uint32_t record_;
    process_identity who_;
    std::string name_;
};

} // namespace vmmpp::detail::pb
