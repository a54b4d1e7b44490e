// vmmpp/quota/shared_budget.hpp: one memory budget shared by several models' pools on a GPU.
// Each model registers with its own limit; a commit takes from the model's limit and the global
// limit in one step under one lock, so no interleaving of pools can overshoot either.
#pragma once

#include <algorithm>
#include <cstddef>
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
    struct state {
        mutable std::mutex mutex;
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

} // namespace vmmpp
