// vmmpp/quota/shared_budget.hpp: one memory budget shared by several models' pools on a GPU.
// Each model registers with its own limit; a commit takes from the model's limit and the global
// limit in one step under one lock, so no interleaving of pools can overshoot either.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/concept.hpp"

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
};

/// Statistics of a whole budget.
struct budget_stats {
    std::size_t limit = 0;
    std::size_t committed = 0;
    std::size_t peak = 0;
    std::size_t denied = 0;
    std::vector<model_stats> models;
};

class shared_budget;

/// A global byte limit shared by several models. Thread safe. Models register with
/// `register_model`, which returns the quota policy their pool is built with. The budget's
/// state lives as long as any of those shares, so destruction order does not matter.
class budget {
public:
    explicit budget(std::size_t global_limit) : state_(std::make_shared<state>()) {
        if (global_limit == 0) {
            throw invalid_argument("a budget's global limit must not be zero");
        }
        state_->limit = global_limit;
    }

    /// Registers a model that may commit at most `limit` bytes (and no more than the global
    /// limit leaves). Names are unique.
    [[nodiscard]] shared_budget register_model(std::string name, std::size_t limit);

    /// A consistent snapshot of the budget and every model.
    [[nodiscard]] budget_stats stats() const {
        std::lock_guard lock(state_->mutex);
        budget_stats s{state_->limit, state_->committed, state_->peak, state_->denied, state_->models};
        return s;
    }

private:
    friend class shared_budget;
    /// A pool's way to give its spare memory back when another model is refused.
    struct reclaimer {
        std::mutex mutex;  // held while `give_back` runs, so unregistering waits for a running call
        std::function<std::size_t()> give_back;
    };
    struct state {
        mutable std::mutex mutex;
        std::vector<std::shared_ptr<reclaimer>> reclaimers;
        std::size_t limit = 0;
        std::size_t committed = 0;
        std::size_t peak = 0;
        std::size_t denied = 0;
        std::vector<model_stats> models;
    };
    std::shared_ptr<state> state_;
};

/// One model's share of a budget: the quota policy of its pool. Copies charge the same model.
class shared_budget {
public:
    /// A copy charges the same model but does not inherit a registered reclaimer.
    shared_budget(const shared_budget& other) : state_(other.state_), index_(other.index_), name_(other.name_) {}
    shared_budget& operator=(const shared_budget& other) {
        if (this != &other) {
            clear_reclaimer();
            state_ = other.state_;
            index_ = other.index_;
            name_ = other.name_;
        }
        return *this;
    }
    shared_budget(shared_budget&&) noexcept = default;
    shared_budget& operator=(shared_budget&& other) noexcept {
        if (this != &other) {
            clear_reclaimer();
            state_ = std::move(other.state_);
            index_ = other.index_;
            name_ = std::move(other.name_);
            reclaimer_ = std::move(other.reclaimer_);
        }
        return *this;
    }
    ~shared_budget() { clear_reclaimer(); }

    /// Takes `bytes` from this model's limit and the global limit together, or throws
    /// vmmpp::over_quota naming the limit that refused it and changes nothing.
    void acquire(std::size_t bytes) {
        std::lock_guard lock(state_->mutex);
        model_stats& m = state_->models[index_];
        if (bytes > m.limit - m.committed) {
            ++m.denied;
            ++state_->denied;
            throw over_quota("model " + m.name, bytes, m.committed, m.limit);
        }
        if (bytes > state_->limit - state_->committed) {
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

    /// Registers `give_back` (returns the bytes it released to this budget) as this share's way
    /// to free spare memory when another share is refused: reclaim_from_others calls it. One per
    /// share object; a pool registers its own copy and clears it before it goes.
    void set_reclaimer(std::function<std::size_t()> give_back) {
        clear_reclaimer();
        auto r = std::make_shared<budget::reclaimer>();
        r->give_back = std::move(give_back);
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
        std::vector<std::shared_ptr<budget::reclaimer>> others;
        {
            std::lock_guard lock(state_->mutex);
            others = state_->reclaimers;  // NOLINT: a few pointers; copying keeps the budget lock a leaf
        }
        std::size_t freed = 0;
        for (const auto& r : others) {
            if (r == reclaimer_) {
                continue;
            }
            std::unique_lock running(r->mutex, std::try_to_lock);
            if (running && r->give_back) {
                freed += r->give_back();
            }
        }
        return freed;
    }

    /// This model's statistics now.
    [[nodiscard]] model_stats stats() const {
        std::lock_guard lock(state_->mutex);
        return state_->models[index_];
    }

    [[nodiscard]] const std::string& name() const noexcept { return name_; }

private:
    friend class budget;
    shared_budget(std::shared_ptr<budget::state> s, std::size_t index, std::string name)
        : state_(std::move(s)), index_(index), name_(std::move(name)) {}

    std::shared_ptr<budget::state> state_;
    std::size_t index_;
    std::string name_;
    std::shared_ptr<budget::reclaimer> reclaimer_;  // this copy's registration, if any
};

inline shared_budget budget::register_model(std::string name, std::size_t limit) {
    if (limit == 0) {
        throw invalid_argument("model '" + name + "' needs a non-zero limit");
    }
    std::lock_guard lock(state_->mutex);
    for (const auto& m : state_->models) {
        if (m.name == name) {
            throw invalid_argument("model '" + name + "' is already registered with this budget");
        }
    }
    state_->models.push_back(model_stats{name, limit, 0, 0, 0});
    return shared_budget(state_, state_->models.size() - 1, std::move(name));
}

static_assert(quota_policy<shared_budget>, "vmmpp::shared_budget must model vmmpp::quota_policy");
static_assert(reclaiming_quota<shared_budget>, "vmmpp::shared_budget lets pools reclaim each other's spares");

} // namespace vmmpp
