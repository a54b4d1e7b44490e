// vmmpp/quota/detail/budget_share.hpp: what a process budget does in its segment. Registers a
// (model, process) share (taking a model slot and a usage record), acquires and releases bytes
// through it against the model's and the global limit, and takes back the shares of processes
// that died. Each operation is one critical section under the segment's robust lock; every store
// is ordered so that the lock's repair (segment::repair) can rebuild the totals from the records
// after a process dies half way. vmmpp::process_quota and vmmpp::process_budget are thin layers
// over these. Linux only.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/concept.hpp"
#include "vmmpp/quota/limit_change.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"
#include "vmmpp/quota/shared_budget.hpp"  // model_stats

namespace vmmpp::detail::pb {

/// Frees the records of every dead process (is_process_running, which also catches this
/// process's records from before an exec) and gives their bytes back. Returns the bytes.
/// Liveness is read from /proc without the lock (a dead identity never comes back to life).
/// Throws: vmmpp::error if the lock cannot be taken; std::bad_alloc.
/// Thread safety: any threads of any processes at once.
inline std::size_t reclaim_dead(const segment& s) {
    const process_identity me = s.self();
    std::vector<process_identity> others;
    {
        std::lock_guard lock(s.mutex());
        const record_slot* r = s.records();
        for (std::uint32_t i = 0; i < s.max_records(); ++i) {
            const process_identity id = identity_of(r[i]);
            if (r[i].pid != 0 && id != me && std::find(others.begin(), others.end(), id) == others.end()) {
                others.push_back(id);
            }
        }
    }
    std::vector<process_identity> dead;
    for (const auto& id : others) {
        if (!is_process_running(id)) {
            dead.push_back(id);
        }
    }
    if (dead.empty()) {
        return 0;
    }
    std::size_t reclaimed = 0;
    std::lock_guard lock(s.mutex());
    header& h = s.head();
    record_slot* r = s.records();
    for (std::uint32_t i = 0; i < s.max_records(); ++i) {
        if (r[i].pid == 0 || std::find(dead.begin(), dead.end(), identity_of(r[i])) == dead.end()) {
            continue;
        }
        const std::uint64_t bytes = r[i].bytes;
        r[i].bytes = 0;
        ordered();
        r[i].pid = 0;
        ordered();
        if (model_slot* m = s.model_of(r[i])) {
            m->committed -= std::min(bytes, m->committed);
        }
        h.committed -= std::min<std::uint64_t>(bytes, h.committed);
        h.reclaimed_bytes += bytes;
        ++h.reclaimed_records;
        reclaimed += bytes;
    }
    return reclaimed;
}

/// Model slot `i`'s statistics, its spares summed over its records. Call with the lock held.
/// Throws: std::bad_alloc.
inline model_stats stats_of_locked(const segment& s, std::uint32_t i) {
    const model_slot& m = s.models()[i];
    model_stats st;
    st.name = std::string(slot_name(m));
    st.limit = m.limit;
    st.committed = m.committed;
    st.peak = m.peak;
    st.denied = m.denied;
    st.reclaims = m.reclaims;
    st.reclaimed = m.reclaimed;
    const record_slot* r = s.records();
    for (std::uint32_t k = 0; k < s.max_records(); ++k) {
        if (r[k].pid != 0 && r[k].model == i) {
            st.spares += r[k].spares;
        }
    }
    return st;
}

/// Calls this process's reclaimers of `s` that `pick` accepts and that are not busy (being
/// called already, or unregistering), credits each model slot with what its pools gave back, and
/// returns the bytes. The segment's lock is not held during the calls: a pool gives back through
/// release(), which takes it.
/// Throws: nothing (a lock that cannot be taken leaves the credit out).
template <class Pick>
std::size_t run_local_reclaimers(const segment& s, Pick pick) noexcept {
    local_registry* reg = nullptr;
    try {
        reg = &s.local();
    } catch (...) {
        return 0;
    }
    return call_reclaimers(reg->mutex, reg->reclaimers, pick, [&](local_reclaimer& r, std::size_t bytes) {
        process_identity self{};
        try {
            self = s.self();
        } catch (...) {
            // a forked child that cannot read /proc: its record's spares stay as reported
        }
        if (s.mutex().lock_or_error() == 0) {
            std::lock_guard lock(s.mutex(), std::adopt_lock);
            model_slot& m = s.models()[r.model];
            ++m.reclaims;
            m.reclaimed += bytes;
            record_slot* rec = s.records();
            for (std::uint32_t k = 0; k < s.max_records(); ++k) {
                if (owns(rec[k], self, r.model)) {
                    rec[k].spares = 0;  // a reclaim gives every spare of the pool back
                }
            }
        }
    });
}

/// Gives back the spares of this process's pools of every model whose limit (or the global
/// limit) was lowered below what it held since this process last looked: how a lowered limit
/// reaches other processes (process_budget::honour_limits, and the limit watcher thread).
/// Returns the bytes given back.
/// Throws: nothing.
inline std::size_t honour_limits(const segment& s) noexcept {
    std::vector<std::uint64_t> generations;
    std::uint64_t global = 0;
    try {
        generations.resize(s.max_models());
        if (s.mutex().lock_or_error() != 0) {
            return 0;
        }
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        global = s.head().generation;
        for (std::uint32_t i = 0; i < s.max_models(); ++i) {
            generations[i] = s.models()[i].generation;
        }
    } catch (...) {
        return 0;
    }
    std::vector<bool> due(s.max_models(), false);
    bool any = false;
    {
        local_registry& reg = s.local();
        std::lock_guard lock(reg.mutex);
        reg.seen_model_generation.resize(s.max_models(), 0);
        const bool all = global != reg.seen_global_generation;
        reg.seen_global_generation = global;
        for (std::uint32_t i = 0; i < s.max_models(); ++i) {
            due[i] = all || generations[i] != reg.seen_model_generation[i];
            reg.seen_model_generation[i] = generations[i];
            any = any || due[i];
        }
    }
    if (!any) {
        return 0;
    }
    return run_local_reclaimers(s, [&](const local_reclaimer& r) { return r.model < due.size() && due[r.model]; });
}

/// Answers the reclaim requests other processes posted since this process last answered (the
/// watcher's work, share::acquire's other half): gives back the spares and kept handles of this
/// process's pools of every model some other process is waiting for (all of them when one waits
/// under the global limit), then marks this process's records answered and wakes the askers.
/// The segment's lock is not held while the pools give back. Returns the bytes given back.
/// Throws: nothing.
inline std::size_t serve_requests(const segment& s) noexcept {
    process_identity me{};
    std::vector<bool> wanted;
    try {
        me = s.self();
        wanted.resize(s.max_models(), false);
    } catch (...) {
        return 0;
    }
    std::uint64_t ticket = 0;
    bool behind = false;  // a request was posted since this process last answered
    bool all = false;
    bool any = false;
    if (s.mutex().lock_or_error() != 0) {
        return 0;
    }
    {
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        ticket = s.head().requests;
        const record_slot* r = s.records();
        for (std::uint32_t k = 0; k < s.max_records(); ++k) {
            if (r[k].pid == 0) {
                continue;
            }
            if (identity_of(r[k]) == me) {
                behind = behind || r[k].answered < ticket;
                continue;
            }
            const std::uint64_t model = r[k].model;
            if (r[k].asking_global > 0) {
                all = any = true;
            }
            if (r[k].asking_model > 0 && model < wanted.size()) {
                wanted[model] = true;
                any = true;
            }
        }
    }
    if (!behind) {
        return 0;  // a wake-up for something else (a lowered limit, a shutdown)
    }
    std::size_t given = 0;
    if (any) {
        // A busy pool is skipped, not waited for: its holder may be a thread of this process
        // waiting for another process's answer, and the asker waits for this one.
        const bool was = detail::reclaim_without_waiting;
        detail::reclaim_without_waiting = true;
        given = run_local_reclaimers(s, [&](const local_reclaimer& r) {
            return all || (r.model < wanted.size() && wanted[r.model]);
        });
        detail::reclaim_without_waiting = was;
    }
    if (s.mutex().lock_or_error() == 0) {
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        record_slot* r = s.records();
        for (std::uint32_t k = 0; k < s.max_records(); ++k) {
            if (r[k].pid != 0 && identity_of(r[k]) == me) {
                r[k].answered = std::max(r[k].answered, ticket);
            }
        }
        s.head().request_reclaimed += given;
        s.head().answer_word.fetch_add(1);
    }
    futex_wake_all(s.head().answer_word);
    return given;
}

/// Sets the limit of model `name` (or, without one, the global limit) to `limit`. Lowering it
/// below what is charged bumps its generation (so other processes' watchers and honour_limits
/// give their spares back) and gives back this process's spares at once. Returns the change,
/// as seen after this process's reclaim.
/// Throws: vmmpp::invalid_argument for a zero limit, vmmpp::unknown_model for a name no slot
/// has (nothing changed); vmmpp::error if the lock cannot be taken.
inline limit_change set_limit(const segment& s, const std::string_view* name, std::uint64_t limit) {
    if (limit == 0) {
        throw invalid_argument("process budget '" + s.name() + "': a limit must not be zero");
    }
    std::uint32_t index = s.max_models();
    std::uint64_t previous = 0;
    bool lowered_below = false;
    {
        // This process acts on its own change below: it records the new generation as seen in the
        // same critical section, so its watcher (woken meanwhile by anything) does not reclaim too.
        local_registry& reg = s.local();
        std::lock_guard local_lock(reg.mutex);
        reg.seen_model_generation.resize(s.max_models(), 0);
        std::lock_guard lock(s.mutex());
        header& h = s.head();
        if (name == nullptr) {
            previous = h.limit;
            h.limit = limit;
            lowered_below = h.committed > limit;
            h.generation += lowered_below ? 1 : 0;
            if (lowered_below) {
                reg.seen_global_generation = h.generation;
            }
        } else {
            for (std::uint32_t i = 0; i < s.max_models(); ++i) {
                if (s.models()[i].name[0] != '\0' && *name == slot_name(s.models()[i])) {
                    index = i;
                }
            }
            if (index == s.max_models()) {
                throw unknown_model("process budget '" + s.name() + "' has no model '" + std::string(*name) + "'");
            }
            model_slot& m = s.models()[index];
            previous = m.limit;
            m.limit = limit;
            lowered_below = m.committed > limit;
            m.generation += lowered_below ? 1 : 0;
            if (lowered_below) {
                reg.seen_model_generation[index] = m.generation;
            }
        }
    }
    std::size_t reclaimed = 0;
    if (lowered_below) {
        reclaimed = run_local_reclaimers(s, [&](const local_reclaimer& r) { return name == nullptr || r.model == index; });
        // Wake the other processes' watchers: they honour the new generation without polling.
        s.head().wake_word.fetch_add(1);
        futex_wake_all(s.head().wake_word);
    }
    std::lock_guard lock(s.mutex());
    const std::uint64_t committed = name == nullptr ? s.head().committed : s.models()[index].committed;
    return detail::make_limit_change(previous, limit, committed, reclaimed);
}

/// Removes model `name` from the table, after freeing the records of dead processes. Returns
/// false if there was none.
/// Throws: vmmpp::model_in_use, naming the processes, while live processes hold records of it
/// (nothing changed); vmmpp::error if the lock cannot be taken.
inline bool remove_model(const segment& s, std::string_view name) {
    reclaim_dead(s);
    std::lock_guard lock(s.mutex());
    model_slot* m = s.models();
    for (std::uint32_t i = 0; i < s.max_models(); ++i) {
        if (m[i].name[0] == '\0' || name != slot_name(m[i])) {
            continue;
        }
        std::string holders;
        const record_slot* r = s.records();
        for (std::uint32_t k = 0; k < s.max_records(); ++k) {
            if (r[k].pid != 0 && r[k].model == i) {
                holders += (holders.empty() ? "" : ", ") + std::to_string(r[k].pid) + " (" +
                           std::to_string(r[k].bytes) + " bytes)";
            }
        }
        if (!holders.empty()) {
            throw model_in_use("model '" + std::string(name) + "' of process budget '" + s.name() +
                               "' is still registered by processes " + holders +
                               ": stop them first");
        }
        m[i].name[0] = '\0';  // the slot is free from this store on
        ordered();
        std::memset(&m[i], 0, sizeof m[i]);
        return true;
    }
    return false;
}

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
        }
        q.ticket = 0;
    }

    std::shared_ptr<const segment> segment_;
    std::uint32_t model_;
    std::uint32_t record_;
    process_identity who_;
    std::string name_;
};

/// Registers model `name` for process `who` in `s` and returns its share. The first registration
/// (by any process) creates the model with `limit`; later ones join it and must state the same
/// limit. A process that registers a model twice gets its one record again. `watching`: whether
/// `who` runs a watcher that serves reclaim requests (segment::serving_requests), so that others
/// may ask it for its spares. When the record table
/// is full, the records of dead processes are freed and it tries once more.
/// Throws: vmmpp::invalid_argument for a name that is not 1 to 63 bytes without NUL, a zero limit,
/// or a limit other than the model's; vmmpp::error when the model table or the record table is
/// full, or the lock cannot be taken.
/// Thread safety: any threads of any processes at once.
inline share register_share(std::shared_ptr<const segment> segment_ptr, std::string_view name, std::size_t limit,
                            const process_identity& who, bool watching = false) {
    if (name.empty() || name.size() >= name_capacity || name.find('\0') != std::string_view::npos) {
        throw invalid_argument("model name '" + std::string(name) + "' must be 1 to " +
                               std::to_string(name_capacity - 1) + " bytes without NUL");
    }
    if (limit == 0) {
        throw invalid_argument("model '" + std::string(name) + "' needs a non-zero limit");
    }
    const segment& s = *segment_ptr;
    for (int attempt = 0;; ++attempt) {
        {
            std::lock_guard lock(s.mutex());
            model_slot* m = s.models();
            record_slot* r = s.records();
            std::uint32_t model = s.max_models();
            std::uint32_t free_model = s.max_models();
            for (std::uint32_t i = 0; i < s.max_models(); ++i) {
                if (m[i].name[0] == '\0') {
                    free_model = std::min(free_model, i);
                } else if (name == slot_name(m[i])) {
                    model = i;
                    break;
                }
            }
            if (model < s.max_models()) {
                if (m[model].registered_limit != limit) {
                    throw invalid_argument("model '" + std::string(name) + "' is registered with limit " +
                                           std::to_string(m[model].registered_limit) + " bytes in process budget '" + s.name() +
                                           "', not " + std::to_string(limit));
                }
                for (std::uint32_t i = 0; i < s.max_records(); ++i) {
                    if (owns(r[i], who, model)) {
                        r[i].watching = r[i].watching != 0 || watching ? 1 : 0;
                        return share(segment_ptr, model, i, who, std::string(name));
                    }
                }
            } else if (free_model == s.max_models()) {
                throw error("vmmpp process budget '" + s.name() + "' has no room for model '" + std::string(name) +
                            "': all " + std::to_string(s.max_models()) +
                            " model slots are taken (process_budget_options::max_models)");
            }
            std::uint32_t record = s.max_records();
            for (std::uint32_t i = 0; i < s.max_records(); ++i) {
                if (r[i].pid == 0) {
                    record = i;
                    break;
                }
            }
            if (record < s.max_records()) {
                if (model == s.max_models()) {
                    model = free_model;
                    model_slot& slot = m[model];
                    slot.limit = limit;
                    slot.committed = 0;
                    slot.peak = 0;
                    slot.denied = 0;
                    slot.registered_limit = limit;
                    slot.generation = 0;
                    slot.reclaims = 0;
                    slot.reclaimed = 0;
                    std::memset(slot.name, 0, sizeof slot.name);
                    std::memcpy(slot.name + 1, name.data() + 1, name.size() - 1);
                    ordered();
                    slot.name[0] = name[0];  // the slot is taken from this store on
                }
                r[record].start_time = who.start_time;
                r[record].image = who.image;
                r[record].model = model;
                r[record].bytes = 0;
                r[record].spares = 0;
                r[record].answered = s.head().requests;  // nothing asked before it exists
                r[record].watching = watching ? 1 : 0;
                r[record].asking_model = 0;
                r[record].asking_global = 0;
                ordered();
                r[record].pid = who.pid;  // the record is taken from this store on
                return share(segment_ptr, model, record, who, std::string(name));
            }
            if (attempt > 0) {
                throw error("vmmpp process budget '" + s.name() + "' has no free usage record for model '" +
                            std::string(name) + "': all " + std::to_string(s.max_records()) +
                            " are held by live processes (process_budget_options::max_records)");
            }
        }
        reclaim_dead(s);
    }
}

/// This process's hold on its usage record of one model: every process_quota of that (model,
/// process) shares one, and the last to go frees the record, giving back what it still holds, so
/// that remove_model can remove an unloaded model and a reload may state another limit. The model
/// slot stays (see process_budget::register_model).
/// Thread safety: made and destroyed under the registry's holds_mutex order (register_held).
class record_hold {
public:
    record_hold() noexcept = default;
    record_hold(const record_hold&) = delete;
    record_hold& operator=(const record_hold&) = delete;
    ~record_hold() {
        if (!share_) {
            return;  // made for a registration that found a hold already, or failed
        }
        const share& sh = *share_;
        const segment& s = sh.seg();
        std::lock_guard holds(s.local().holds_mutex);
        std::weak_ptr<record_hold>& slot = s.local().holds[sh.record()];
        if (!slot.expired()) {
            return;  // a registration after this hold expired took the record over
        }
        slot.reset();
        if (::getpid() != sh.who().pid || s.mutex().lock_or_error() != 0) {
            return;  // a fork's copy: the record is the parent's; or no lock: death frees it
        }
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        record_slot& r = s.records()[sh.record()];
        if (!owns(r, sh.who(), sh.model())) {
            return;  // freed already (this process was taken for dead)
        }
        const std::uint64_t bytes = r.bytes;
        r.bytes = 0;  // the record first, as reclaim_dead: repair() rebuilds the totals from it
        ordered();
        r.pid = 0;
        ordered();
        model_slot& m = s.models()[sh.model()];
        m.committed -= std::min(bytes, m.committed);
        header& h = s.head();
        h.committed -= std::min<std::uint64_t>(bytes, h.committed);
    }

private:
    friend std::pair<share, std::shared_ptr<record_hold>> register_held(const std::shared_ptr<const segment>&,
                                                                         std::string_view, std::size_t,
                                                                         const process_identity&, bool);
    std::optional<share> share_;
};

/// register_share for `who`, and this process's hold on the record: the one its other quotas of
/// the model hold, or a new one.
/// Throws: as register_share; std::bad_alloc (nothing changed).
inline std::pair<share, std::shared_ptr<record_hold>> register_held(const std::shared_ptr<const segment>& s,
                                                                    std::string_view name, std::size_t limit,
                                                                    const process_identity& who, bool watching) {
    local_registry& reg = s->local();
    auto fresh = std::make_shared<record_hold>();  // before the record is taken: nothing to undo
    std::lock_guard holds(reg.holds_mutex);
    reg.holds.resize(std::max<std::size_t>(reg.holds.size(), s->max_records()));
    share sh = register_share(s, name, limit, who, watching);
    std::weak_ptr<record_hold>& slot = reg.holds[sh.record()];
    std::shared_ptr<record_hold> held = slot.lock();
    if (!held) {
        fresh->share_.emplace(sh);
        slot = fresh;
        held = std::move(fresh);
    }
    return {std::move(sh), std::move(held)};
}

} // namespace vmmpp::detail::pb
