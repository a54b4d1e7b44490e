// vmmpp/quota/shared_budget.hpp: one memory budget shared by several models' pools on a GPU.
// Each model registers with its own limit; a commit takes from the model's limit and the global
// limit in one step under one lock, so no interleaving of pools can overshoot either.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/concept.hpp"
#include "vmmpp/quota/limit_change.hpp"

namespace vmmpp {

/// Statistics of one model registered with a budget.
struct model_stats {
    std::string name;
    std::size_t limit = 0;
    std::size_t committed = 0;
    /// Most bytes charged at once, including a charge whose backing commit then failed and was
    /// given back (a pool charges the quota before it commits).
    std::size_t peak = 0;
    std::size_t denied = 0;  ///< requests refused (by this model's limit or the global one)
    /// Times one of the model's pools gave memory back when asked (another model's pressure, a
    /// lowered limit) and gave back something.
    std::uint64_t reclaims = 0;
    std::size_t reclaimed = 0;  ///< bytes those reclaims gave back
    /// Times the model's cache reclaimers (a prefix cache's lending, vmmpp/prefix/lending.hpp)
    /// evicted cached blocks for another model's refused commit and emptied some pages.
    std::uint64_t cache_reclaims = 0;
    std::size_t cache_reclaimed = 0;  ///< bytes of pages those evictions emptied
    /// Spare bytes (committed or kept, held by nothing) its pools last reported
    /// (vmmpp::report_spares): reclaimable at once, as of each pool's last report.
    std::size_t spares = 0;

    /// Bytes charged above the limit (after a lowered limit, until live blocks fit), else 0.
    [[nodiscard]] std::size_t over() const noexcept { return committed > limit ? committed - limit : 0; }
};

/// Statistics of a whole budget.
struct budget_stats {
    std::size_t limit = 0;
    std::size_t committed = 0;
    std::size_t peak = 0;
    std::size_t denied = 0;
    std::vector<model_stats> models;

    /// Bytes charged above the global limit, else 0.
    [[nodiscard]] std::size_t over() const noexcept { return committed > limit ? committed - limit : 0; }
};

namespace detail {

/// Calls call(reclaimer) (noexcept, returns bytes) for each reclaimer of `registered`
/// (shared_ptrs to records with a `mutex`) that `pick` accepts and that is not busy (being called
/// already, or unregistering: its own mutex is held). `registry_mutex` guards the list while the
/// choice is made and is not held during the calls: a pool gives back through release(), which
/// takes the budget's lock. Calls credit(reclaimer, bytes) for each call that returned bytes;
/// returns their sum.
/// Throws: nothing (with no memory for the list of chosen ones, nothing is called).
template <class Mutex, class Reclaimers, class Pick, class Call, class Credit>
std::size_t call_each_reclaimer(Mutex& registry_mutex, const Reclaimers& registered, Pick pick, Call call,
                                Credit credit) noexcept {
    std::vector<typename Reclaimers::value_type> chosen;
    try {
        std::lock_guard lock(registry_mutex);
        for (const auto& r : registered) {
            if (pick(*r)) {
                chosen.push_back(r);
            }
        }
    } catch (...) {
        return 0;  // nothing asked, nothing changed
    }
    std::size_t freed = 0;
    for (const auto& r : chosen) {
        std::unique_lock running(r->mutex, std::try_to_lock);
        if (!running) {
            continue;
        }
        const std::size_t bytes = call(*r);
        if (bytes > 0) {
            freed += bytes;
            credit(*r, bytes);
        }
    }
    return freed;
}

/// call_each_reclaimer for spare reclaimers (records with a `give_back` function, empty once
/// unregistered).
template <class Mutex, class Reclaimers, class Pick, class Credit>
std::size_t call_reclaimers(Mutex& registry_mutex, const Reclaimers& registered, Pick pick, Credit credit) noexcept {
    return call_each_reclaimer(
        registry_mutex, registered, pick, [](auto& r) noexcept { return r.give_back ? r.give_back() : 0; }, credit);
}

/// The cache-reclaim step of a refused request of `bytes` (see vmmpp::cache_reclaiming_quota):
/// `room()` gives the bytes left now under the model's own limit and under the global one;
/// `run()` asks the chosen cache reclaimers in turn (evict_until_room each). Returns the room
/// gained, or the room found when the request fits already; 0 when the model's own limit refuses
/// or nothing came back.
template <class Room, class Run>
std::size_t reclaim_cached_for(std::size_t bytes, Room room, Run run) noexcept {
    const auto [model_left, global_left] = room();
    if (bytes > model_left) {
        return 0;  // the model's own limit: other models' memory cannot help
    }
    if (bytes <= global_left) {
        return global_left;  // released meanwhile: the retry fits
    }
    run();
    const std::size_t now = room().second;
    return now > global_left ? now - global_left : 0;
}

/// One cache reclaimer's part of reclaim_cached_for: evict(shortfall), then give_back() (its
/// model's spare reclaimers: the emptied pages go back to the quota), again while the request
/// does not fit and it evicts something. Again, because emptied pages may not come back at
/// once: a pool gives memory back by whole extents (adaptive_extents: a prompt's pages are one
/// extent), and pages under queued GPU work only once it completes. Returns the page bytes it
/// emptied.
template <class Room, class Evict, class GiveBack>
std::size_t evict_until_room(std::size_t bytes, Room room, const Evict& evict, GiveBack give_back) noexcept {
    std::size_t emptied = 0;
    for (;;) {
        const std::size_t left = room().second;
        if (bytes <= left || !evict) {
            return emptied;
        }
        const std::size_t now = evict(bytes - left);
        if (now == 0) {
            return emptied;  // nothing left to evict (or its owner is busy)
        }
        emptied += now;
        give_back();
    }
}

} // namespace detail

class shared_budget;

/// A global byte limit shared by several models. Thread safe. Models register with
/// `register_model`, which returns the quota policy their pool is built with. The budget's
/// state lives as long as any of those shares, so destruction order does not matter.
///
/// A model is registered while any share of it lives (the shared_budget register_model returned,
/// its copies, the copies pools hold): when the last one goes, the model is unregistered, leaves
/// stats(), and its name may be registered again (unload and reload a model; a kv_cache
/// constructor that throws after its argument registered leaves nothing behind). There is no
/// explicit removal: a share that outlived its registration would charge nothing anyone sees.
///
/// Limits change at run time (set_limit, set_model_limit, shared_budget::set_limit): raising one
/// takes effect at once; lowering one asks the pools charged to it for their spares and kept
/// handles at once, refuses commits above it from then on, and reports what live blocks still
/// hold above it (vmmpp::limit_change).
class budget {
public:
    explicit budget(std::size_t global_limit) : state_(std::make_shared<state>()) {
        if (global_limit == 0) {
            throw invalid_argument("a budget's global limit must not be zero");
        }
        state_->limit = global_limit;
    }

    /// Registers a model that may commit at most `limit` bytes (and no more than the global
    /// limit leaves), until the last share of it goes. Names are unique among live models.
    /// Throws: vmmpp::invalid_argument for a zero limit or a name registered now (nothing changed).
    [[nodiscard]] shared_budget register_model(std::string name, std::size_t limit);

    /// Sets the global limit. Lowering it below what is charged asks every model's pools for
    /// their spares and kept handles before it returns.
    /// Throws: vmmpp::invalid_argument for a zero limit (nothing changed).
    /// Waits: for each pool's lock, up to the pool's reclaim wait (a busy pool is skipped).
    limit_change set_limit(std::size_t global_limit) {
        if (global_limit == 0) {
            throw invalid_argument("a budget's global limit must not be zero");
        }
        return change_limit(*state_, no_model, global_limit);
    }

    /// Sets model `name`'s limit, as set_limit does the global one (only that model's pools are
    /// asked for spares).
    /// Throws: vmmpp::invalid_argument for a zero limit, vmmpp::unknown_model for a model not
    /// registered (nothing changed).
    /// Waits: as set_limit.
    limit_change set_model_limit(std::string_view name, std::size_t limit) {
        if (limit == 0) {
            throw invalid_argument("model '" + std::string(name) + "' needs a non-zero limit");
        }
        return change_limit(*state_, no_model, limit, &name);
    }

    /// A consistent snapshot of the budget and every model registered now, in registration slot
    /// order (a reloaded model may take an unloaded one's place).
    [[nodiscard]] budget_stats stats() const {
        std::lock_guard lock(state_->mutex);
        budget_stats s{state_->limit, state_->committed, state_->peak, state_->denied, {}};
        std::vector<std::size_t> spares(state_->models.size(), 0);
        for (const auto& r : state_->spare_reports) {
            spares[r->model] += r->bytes.load(std::memory_order_relaxed);
        }
        for (std::size_t i = 0; i < state_->models.size(); ++i) {
            if (state_->shares[i] > 0) {
                s.models.push_back(state_->models[i]);
                s.models.back().spares += spares[i];
            }
        }
        return s;
    }

private:
    friend class shared_budget;
    static constexpr std::size_t no_model = static_cast<std::size_t>(-1);
    /// The spare bytes one share last reported.
    struct spare_report {
        std::size_t model = 0;
        std::atomic<std::size_t> bytes{0};
    };
    /// A pool's way to give its spare memory back when another model is refused.
    struct reclaimer {
        std::mutex mutex;  // held while `give_back` runs, so unregistering waits for a running call
        std::function<std::size_t()> give_back;
        std::size_t model = 0;
        std::shared_ptr<spare_report> spares;  // its share's report: none left after a reclaim
    };
    /// A model's way to evict cached blocks (about `bytes` of pages) when another model is
    /// refused and no spares were left (vmmpp::cache_reclaiming_quota).
    struct cache_reclaimer {
        std::mutex mutex;  // held while `evict` runs, so unregistering waits for a running call
        std::function<std::size_t(std::size_t)> evict;
        std::size_t model = 0;
    };
    struct state {
        mutable std::mutex mutex;
        std::vector<std::shared_ptr<reclaimer>> reclaimers;
        std::vector<std::shared_ptr<cache_reclaimer>> cache_reclaimers;
        std::vector<std::shared_ptr<spare_report>> spare_reports;
        std::size_t limit = 0;
        std::size_t committed = 0;
        std::size_t peak = 0;
        std::size_t denied = 0;
        std::vector<model_stats> models;  // by slot; a slot with no share is free
        std::vector<std::size_t> shares;  // live shared_budget objects of each slot's model
    };

    /// Calls every registered reclaimer that `pick` accepts and is not busy (its pool is being
    /// reclaimed already, or is unregistering), credits each model with what its pools gave
    /// back, and returns the bytes. The budget's lock is not held during the calls: a pool gives
    /// back through release(), which takes it.
    template <class Pick>
    static std::size_t run_reclaimers(state& st, Pick pick) noexcept {
        return detail::call_reclaimers(st.mutex, st.reclaimers, pick, [&](reclaimer& r, std::size_t bytes) {
            if (r.spares) {
                r.spares->bytes.store(0, std::memory_order_relaxed);  // a reclaim gives every spare back
            }
            std::lock_guard lock(st.mutex);
            model_stats& m = st.models[r.model];
            ++m.reclaims;
            m.reclaimed += bytes;
        });
    }

    /// Sets the limit of model `index` (no_model: the global one), or of the live model called
    /// `*name` (found under the same lock, so an unload cannot slip in between), reclaims when it
    /// went below what is charged, and says where that left it.
    /// Throws: vmmpp::unknown_model for a `*name` not registered now (nothing changed).
    static limit_change change_limit(state& st, std::size_t index, std::size_t limit,
                                     const std::string_view* name = nullptr) {
        std::size_t previous = 0;
        std::size_t committed = 0;
        {
            std::lock_guard lock(st.mutex);
            if (name != nullptr) {
                for (std::size_t i = 0; i < st.models.size(); ++i) {
                    if (st.shares[i] > 0 && st.models[i].name == *name) {
                        index = i;
                    }
                }
                if (index == no_model) {
                    throw unknown_model("model '" + std::string(*name) + "' is not registered with this budget");
                }
            }
            std::size_t& target = index == no_model ? st.limit : st.models[index].limit;
            previous = target;
            target = limit;
            committed = index == no_model ? st.committed : st.models[index].committed;
        }
        std::size_t reclaimed = 0;
        if (committed > limit) {
            reclaimed = run_reclaimers(st, [&](const reclaimer& r) { return index == no_model || r.model == index; });
        }
        std::lock_guard lock(st.mutex);
        committed = index == no_model ? st.committed : st.models[index].committed;
        return detail::make_limit_change(previous, limit, committed, reclaimed);
    }

    std::shared_ptr<state> state_;
};

/// One model's share of a budget: the quota policy of its pool. Copies charge the same model.
class shared_budget {
public:
    /// A copy charges the same model but does not inherit a registered reclaimer, and reports
    /// spares of its own.
    shared_budget(const shared_budget& other)
        : state_(other.state_), index_(other.index_), name_(other.name_), spares_(join(state_, index_)) {}
    shared_budget& operator=(const shared_budget& other) {
        if (this != &other) {
            auto report = join(other.state_, other.index_);  // may throw: nothing changed yet
            leave();
            state_ = other.state_;
            index_ = other.index_;
            name_ = other.name_;
            spares_ = std::move(report);
        }
        return *this;
    }
    shared_budget(shared_budget&&) noexcept = default;
    shared_budget& operator=(shared_budget&& other) noexcept {
        if (this != &other) {
            leave();
            state_ = std::move(other.state_);
            index_ = other.index_;
            name_ = std::move(other.name_);
            reclaimer_ = std::move(other.reclaimer_);
            cache_reclaimer_ = std::move(other.cache_reclaimer_);
            spares_ = std::move(other.spares_);
        }
        return *this;
    }
    /// The last share of a model unregisters it (see vmmpp::budget).
    ~shared_budget() { leave(); }

    /// Takes `bytes` from this model's limit and the global limit together, or throws
    /// vmmpp::over_quota naming the limit that refused it and changes nothing. A limit lowered
    /// below what is charged refuses every request until enough is released.
    void acquire(std::size_t bytes) {
        std::lock_guard lock(state_->mutex);
        model_stats& m = state_->models[index_];
        const std::size_t model_left = m.limit > m.committed ? m.limit - m.committed : 0;
        const std::size_t global_left = state_->limit > state_->committed ? state_->limit - state_->committed : 0;
        if (bytes > model_left) {
            ++m.denied;
            ++state_->denied;
            throw over_quota("model " + m.name, bytes, m.committed, m.limit);
        }
        if (bytes > global_left) {
            ++m.denied;
            ++state_->denied;
            throw over_quota("global", bytes, state_->committed, state_->limit);
        }
        m.committed += bytes;
        m.peak = std::max(m.peak, m.committed);
        state_->committed += bytes;
        state_->peak = std::max(state_->peak, state_->committed);
    }

    /// Gives `bytes` back to both limits.
    void release(std::size_t bytes) noexcept {
        std::lock_guard lock(state_->mutex);
        model_stats& m = state_->models[index_];
        const std::size_t n = std::min(bytes, m.committed);  // never underflow on misuse
        m.committed -= n;
        state_->committed -= n;
    }

    /// Sets this model's limit at run time: budget::set_model_limit for this share's model.
    /// Throws: vmmpp::invalid_argument for a zero limit (nothing changed).
    limit_change set_limit(std::size_t limit) {
        if (limit == 0) {
            throw invalid_argument("model '" + name_ + "' needs a non-zero limit");
        }
        return budget::change_limit(*state_, index_, limit);
    }

    /// Reports the spare bytes (committed or kept, held by nothing) of the pool charging this
    /// share, for statistics and the budget tool; the model's spares are the sum over its shares'
    /// last reports. vmmpp::report_spares(pool) reads them from the pool.
    void report_spares(std::size_t bytes) const noexcept {
        if (spares_) {
            spares_->bytes.store(bytes, std::memory_order_relaxed);
        }
    }

    /// Registers `give_back` (returns the bytes it released to this budget) as this share's way
    /// to free spare memory when another share is refused or a limit is lowered: reclaim_from_others
    /// and the limit setters call it. One per share object; a pool registers its own copy and
    /// clears it before it goes.
    void set_reclaimer(std::function<std::size_t()> give_back) {
        clear_reclaimer();
        auto r = std::make_shared<budget::reclaimer>();
        r->give_back = std::move(give_back);
        r->model = index_;
        r->spares = spares_;
        std::lock_guard lock(state_->mutex);
        state_->reclaimers.push_back(r);
        reclaimer_ = std::move(r);
    }
    /// Unregisters this share's reclaimer; waits for a call of it in progress to finish.
    void clear_reclaimer() noexcept {
        if (!reclaimer_) {
            return;
        }
        const std::shared_ptr<budget::reclaimer> mine = std::move(reclaimer_);  // outlives the lock below
        {
            std::lock_guard lock(state_->mutex);
            std::erase(state_->reclaimers, mine);
        }
        std::lock_guard running(mine->mutex);
        mine->give_back = nullptr;
    }
    /// Asks every other registered share to give its spare memory back now (budget pressure).
    /// A reclaimer that is busy (its pool locked by its own thread) is skipped rather than
    /// waited for, so two pools reclaiming from each other cannot deadlock. Returns the bytes
    /// given back.
    std::size_t reclaim_from_others() noexcept {
        const budget::reclaimer* self = reclaimer_.get();
        return budget::run_reclaimers(*state_, [self](const budget::reclaimer& r) { return &r != self; });
    }

    /// Registers `evict` (evicts cached blocks until about the given bytes of its pool's pages
    /// hold nothing, returns the page bytes it emptied; must not throw) as this share's cache
    /// reclaimer: another model's reclaim_cached_from_others calls it. One per share object (a
    /// copy has a slot of its own); clear it before what it evicts goes.
    void set_cache_reclaimer(std::function<std::size_t(std::size_t)> evict) {
        clear_cache_reclaimer();
        auto r = std::make_shared<budget::cache_reclaimer>();
        r->evict = std::move(evict);
        r->model = index_;
        std::lock_guard lock(state_->mutex);
        state_->cache_reclaimers.push_back(r);
        cache_reclaimer_ = std::move(r);
    }
    /// Unregisters this share's cache reclaimer; waits for a call of it in progress to finish.
    void clear_cache_reclaimer() noexcept {
        if (!cache_reclaimer_) {
            return;
        }
        const std::shared_ptr<budget::cache_reclaimer> mine = std::move(cache_reclaimer_);
        {
            std::lock_guard lock(state_->mutex);
            std::erase(state_->cache_reclaimers, mine);
        }
        std::lock_guard running(mine->mutex);
        mine->evict = nullptr;
    }
    /// For a commit of `bytes` this model was refused (after reclaim_from_others made no room):
    /// asks the cache reclaimers of the other models, in registration order, for the shortfall
    /// under the global limit, each followed by its model's spare reclaimers (which give the
    /// emptied pages back), until the request fits. A busy reclaimer is skipped. Returns the room
    /// gained (or found, when the request fits already); 0 when this model's own limit refuses
    /// or nothing came back.
    std::size_t reclaim_cached_from_others(std::size_t bytes) noexcept {
        budget::state& st = *state_;
        const std::size_t self = index_;
        const auto room = [&]() noexcept {
            std::lock_guard lock(st.mutex);
            const model_stats& m = st.models[self];
            return std::pair<std::size_t, std::size_t>(m.limit > m.committed ? m.limit - m.committed : 0,
                                                       st.limit > st.committed ? st.limit - st.committed : 0);
        };
        return detail::reclaim_cached_for(bytes, room, [&]() noexcept {
            (void)detail::call_each_reclaimer(
                st.mutex, st.cache_reclaimers, [self](const budget::cache_reclaimer& r) { return r.model != self; },
                [&](budget::cache_reclaimer& r) noexcept {
                    return detail::evict_until_room(bytes, room, r.evict, [&]() noexcept {
                        (void)budget::run_reclaimers(st, [&](const budget::reclaimer& s) { return s.model == r.model; });
                    });
                },
                [&](budget::cache_reclaimer& r, std::size_t emptied) {
                    std::lock_guard lock(st.mutex);
                    ++st.models[r.model].cache_reclaims;
                    st.models[r.model].cache_reclaimed += emptied;
                });
        });
    }

    /// This model's statistics now.
    [[nodiscard]] model_stats stats() const {
        std::lock_guard lock(state_->mutex);
        model_stats s = state_->models[index_];
        for (const auto& r : state_->spare_reports) {
            s.spares += r->model == index_ ? r->bytes.load(std::memory_order_relaxed) : 0;
        }
        return s;
    }

    [[nodiscard]] const std::string& name() const noexcept { return name_; }

private:
    friend class budget;
    /// Takes over the share that register_model counted for slot `index`.
    shared_budget(std::shared_ptr<budget::state> s, std::size_t index, std::string name,
                  std::shared_ptr<budget::spare_report> spares) noexcept
        : state_(std::move(s)), index_(index), name_(std::move(name)), spares_(std::move(spares)) {}

    /// Counts one more share of slot `index` and gives it a spare report of its own.
    /// Throws: std::bad_alloc (nothing changed).
    static std::shared_ptr<budget::spare_report> join(const std::shared_ptr<budget::state>& st, std::size_t index) {
        auto r = std::make_shared<budget::spare_report>();
        r->model = index;
        std::lock_guard lock(st->mutex);
        st->spare_reports.push_back(r);  // may throw: nothing changed
        ++st->shares[index];
        return r;
    }
    /// Clears this share's reclaimer and spare report and uncounts it; the model's last share
    /// frees its slot. Bytes still charged to it then go back to the global limit, since no one
    /// is left to release them. A moved-from share does nothing.
    void leave() noexcept {
        clear_reclaimer();
        clear_cache_reclaimer();
        if (state_ && spares_) {
            std::lock_guard lock(state_->mutex);
            std::erase(state_->spare_reports, spares_);
            if (--state_->shares[index_] == 0) {
                model_stats& m = state_->models[index_];
                state_->committed -= std::min(m.committed, state_->committed);
                m = model_stats{};
            }
        }
        spares_.reset();
    }

    std::shared_ptr<budget::state> state_;
    std::size_t index_;
    std::string name_;
    std::shared_ptr<budget::reclaimer> reclaimer_;  // this copy's registration, if any
    std::shared_ptr<budget::cache_reclaimer> cache_reclaimer_;  // this copy's cache reclaimer, if any
    std::shared_ptr<budget::spare_report> spares_;  // this copy's spare report
};

inline shared_budget budget::register_model(std::string name, std::size_t limit) {
    if (limit == 0) {
        throw invalid_argument("model '" + name + "' needs a non-zero limit");
    }
    auto report = std::make_shared<spare_report>();
    std::lock_guard lock(state_->mutex);
    std::size_t index = state_->models.size();
    for (std::size_t i = 0; i < state_->models.size(); ++i) {
        if (state_->shares[i] == 0) {
            index = std::min(index, i);  // an unloaded model's slot
        } else if (state_->models[i].name == name) {
            throw invalid_argument("model '" + name + "' is already registered with this budget");
        }
    }
    model_stats m;
    m.name = name;
    m.limit = limit;
    std::string share_name = name;  // copies before any change: what follows throws nothing
    state_->spare_reports.reserve(state_->spare_reports.size() + 1);
    if (index == state_->models.size()) {
        state_->models.reserve(index + 1);
        state_->shares.reserve(index + 1);
        state_->models.push_back(std::move(m));
        state_->shares.push_back(1);
    } else {
        state_->models[index] = std::move(m);
        state_->shares[index] = 1;
    }
    report->model = index;
    state_->spare_reports.push_back(report);
    return shared_budget(state_, index, std::move(share_name), std::move(report));
}

static_assert(quota_policy<shared_budget>, "vmmpp::shared_budget must model vmmpp::quota_policy");
static_assert(reclaiming_quota<shared_budget>, "vmmpp::shared_budget lets pools reclaim each other's spares");
static_assert(cache_reclaiming_quota<shared_budget>, "vmmpp::shared_budget lets models reclaim each other's cached blocks");

} // namespace vmmpp
