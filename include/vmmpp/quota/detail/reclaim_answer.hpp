// vmmpp/quota/detail/reclaim_answer.hpp: this process giving back on request or lowered limit.
//
// The answering side of the reclaim protocol (the asking side is share::acquire): this process's
// pools give their spares back when another process posted a request or a limit was lowered.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "vmmpp/quota/concept.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/futex.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"
#include "vmmpp/quota/shared_budget.hpp"  // call_reclaimers

namespace vmmpp::detail::pb {

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

/// Calls this process's cache reclaimers of `s` that `pick` accepts and that are not busy, each
/// (evict_until_room) until `room()` says `bytes` fit, its model's spare reclaimers giving the
/// emptied pages back after each eviction. Returns the page bytes they emptied.
/// Throws: nothing.
template <class Room, class Pick>
std::size_t run_local_cache_reclaimers(const segment& s, std::size_t bytes, Room room, Pick pick) noexcept {
    local_registry* reg = nullptr;
    try {
        reg = &s.local();
    } catch (...) {
        return 0;
    }
    return call_each_reclaimer(
        reg->mutex, reg->cache_reclaimers, pick,
        [&](local_cache_reclaimer& r) noexcept {
            return evict_until_room(bytes, room, r.evict, [&]() noexcept {
                (void)run_local_reclaimers(s, [&](const local_reclaimer& spare) { return spare.model == r.model; });
            });
        },
        [](local_cache_reclaimer&, std::size_t) noexcept {});
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
    std::size_t want = 0;  // what the askers asked for, for the cached blocks' part
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
            if (r[k].asking_global > 0 || r[k].asking_model > 0) {
                // 0: a writer that did not say (the field was padding): a page group at least
                want += r[k].asking_pages != 0 ? std::size_t{r[k].asking_pages} * asking_page_bytes : asking_page_bytes;
            }
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
        if (given < want) {
            // Then this process's cached blocks (prefix_lending), about the rest of what was
            // asked, measured by what this process's records hold.
            const auto held = [&]() noexcept -> std::optional<std::size_t> {
                if (s.mutex().lock_or_error() != 0) {
                    return std::nullopt;
                }
                std::lock_guard lock(s.mutex(), std::adopt_lock);
                std::size_t bytes = 0;
                const record_slot* r = s.records();
                for (std::uint32_t k = 0; k < s.max_records(); ++k) {
                    bytes += r[k].pid != 0 && identity_of(r[k]) == me ? r[k].bytes : 0;
                }
                return bytes;
            };
            const std::optional<std::size_t> before = held();
            const auto room = [&]() noexcept {
                const std::optional<std::size_t> now = held();
                if (!before || !now) {
                    return std::pair<std::size_t, std::size_t>(SIZE_MAX, SIZE_MAX);  // no measure: stop evicting
                }
                return std::pair<std::size_t, std::size_t>(SIZE_MAX, *before > *now ? *before - *now : 0);
            };
            if (before) {
                (void)run_local_cache_reclaimers(s, want - given, room, [&](const local_cache_reclaimer& r) {
                    return all || (r.model < wanted.size() && wanted[r.model]);
                });
                const std::pair<std::size_t, std::size_t> gained = room();
                given += gained.second != SIZE_MAX ? gained.second : 0;
            }
        }
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

} // namespace vmmpp::detail::pb
