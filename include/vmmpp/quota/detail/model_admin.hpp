// vmmpp/quota/detail/model_admin.hpp: a model's statistics, limit changes and removal.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <string_view>

#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/limit_change.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/futex.hpp"
#include "vmmpp/quota/detail/reclaim_answer.hpp"
#include "vmmpp/quota/detail/reclaim_dead.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"
#include "vmmpp/quota/shared_budget.hpp"  // model_stats

namespace vmmpp::detail::pb {

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

} // namespace vmmpp::detail::pb
