// vmmpp/stats.hpp: one snapshot of what a serving system exports about vmmpp (each cache's pool
// and KV statistics, the models' budget shares, the budget, and for a cross-process budget its
// processes) and its JSON rendering, without a JSON library. Also report_spares(pool): how a
// pool's spare bytes reach its budget's statistics (and the vmmpp-budget tool).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmmpp/detail/json.hpp"
#include "vmmpp/pool.hpp"
#include "vmmpp/quota/shared_budget.hpp"

namespace vmmpp {

/// A KV cache's own statistics (what its pool does not know).
struct kv_cache_stats {
    std::size_t sequences = 0;
    std::size_t used_blocks = 0;
    std::size_t free_blocks = 0;
    std::size_t block_bytes = 0;  ///< bytes of one block over every layer, K and V
    std::uint64_t cow_copies = 0;
    bool asleep = false;          ///< its device memory is given back (kv_cache::sleep)
};

/// One process of a cross-process budget, for one model.
struct process_usage_row {
    std::string model;
    std::int64_t pid = 0;
    std::uint64_t start_time = 0;
    std::size_t committed = 0;
};

/// What a cross-process budget adds to budget_stats.
struct process_budget_info {
    std::string name;  ///< the segment ("/name")
    std::size_t reclaimed = 0;
    std::size_t reclaimed_records = 0;
    std::size_t repairs = 0;
    std::size_t max_models = 0;
    std::size_t max_records = 0;
    std::vector<process_usage_row> usage;
};

/// One snapshot of vmmpp's statistics: a list of named pools (with their caches' and models'
/// statistics where there are), and the budget they share. Built with add_cache / add_pool /
/// set_budget / set_process_budget, rendered with to_json. Value-initialize it
/// (`stats_snapshot snap{};`): GCC 12 at -O2 may otherwise warn that destroying its unset
/// optionals reads uninitialized memory (-Wmaybe-uninitialized, a false positive).
struct stats_snapshot {
    /// One pool, by the name the caller gives it.
    struct pool_entry {
        std::string name;
        pool_stats pool;
        std::size_t unit_bytes = 0;             ///< bytes of one growth unit
        std::optional<kv_cache_stats> cache;   ///< when the pool is a kv_cache's
        std::optional<model_stats> model;      ///< when its quota is a model's share of a budget
    };

    /// When it was taken (milliseconds since the Unix epoch).
    std::uint64_t unix_ms = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
    std::vector<pool_entry> pools;
    std::optional<budget_stats> budget;
    std::optional<process_budget_info> process_budget;

    /// Adds a pool (elastic_pool<Config>) under `name`, with its model's statistics when its
    /// quota has them (shared_budget, process_quota).
    template <class Pool>
    stats_snapshot& add_pool(std::string name, const Pool& pool) {
        pool_entry e;
        e.name = std::move(name);
        e.pool = pool.stats();
        e.unit_bytes = pool.unit_bytes();
        if constexpr (requires { { pool.quota().stats() } -> std::convertible_to<model_stats>; }) {
            e.model = pool.quota().stats();
        }
        pools.push_back(std::move(e));
        return *this;
    }

    /// Adds a kv_cache's pool under `name`, with the cache's own statistics.
    template <class Cache>
        requires requires(const Cache& c) { c.pool(); c.used_blocks(); c.sequence_count(); }
    stats_snapshot& add_cache(std::string name, const Cache& cache) {
        add_pool(std::move(name), cache.pool());
        kv_cache_stats k;
        k.sequences = cache.sequence_count();
        k.used_blocks = cache.used_blocks();
        k.free_blocks = cache.free_blocks();
        k.block_bytes = cache.geometry().block_bytes();
        k.cow_copies = cache.cow_copies();
        if constexpr (requires { { cache.asleep() } -> std::convertible_to<bool>; }) {
            k.asleep = cache.asleep();
        }
        pools.back().cache = k;
        return *this;
    }

    /// Sets the budget (vmmpp::budget::stats()).
    stats_snapshot& set_budget(budget_stats b) {
        budget.emplace(std::move(b));  // not operator=: see set_process_budget
        return *this;
    }

    /// Sets a cross-process budget (vmmpp::process_budget::stats(), and its name): its
    /// budget_stats part, and what is particular to processes.
    template <class ProcessBudgetStats>
    stats_snapshot& set_process_budget(std::string name, const ProcessBudgetStats& s) {
        // emplace rather than operator=: assigning to an optional that may be engaged makes GCC 12
        // at -O2 warn (-Wmaybe-uninitialized, a false positive) in every caller's build.
        budget.emplace(static_cast<const budget_stats&>(s));
        process_budget_info p;
        p.name = std::move(name);
        p.reclaimed = s.reclaimed;
        p.reclaimed_records = s.reclaimed_records;
        p.repairs = s.repairs;
        p.max_models = s.max_models;
        p.max_records = s.max_records;
        for (const auto& u : s.usage) {
            p.usage.push_back({u.model, static_cast<std::int64_t>(u.process.pid), u.process.start_time, u.committed});
        }
        process_budget.emplace(std::move(p));
        return *this;
    }
};

namespace detail {

inline void write_json(json_writer& w, std::string_view key, const model_stats& m) {
    w.begin_object(key)
        .string("name", m.name)
        .number("limit", m.limit)
        .number("committed", m.committed)
        .number("over", m.over())
        .number("peak", m.peak)
        .number("denied", m.denied)
        .number("reclaims", m.reclaims)
        .number("reclaimed", m.reclaimed)
        .number("spares", m.spares)
        .end_object();
}

inline void write_json(json_writer& w, std::string_view key, const budget_stats& b) {
    w.begin_object(key)
        .number("limit", b.limit)
        .number("committed", b.committed)
        .number("over", b.over())
        .number("peak", b.peak)
        .number("denied", b.denied);
    w.begin_array("models");
    for (const auto& m : b.models) {
        write_json(w, {}, m);
    }
    w.end_array().end_object();
}

inline void write_json(json_writer& w, std::string_view key, const pool_stats& p, std::size_t unit_bytes) {
    w.begin_object(key)
        .number("reserved", p.reserved)
        .number("committed", p.committed)
        .number("peak_committed", p.peak_committed)
        .number("charged", p.charged)
        .number("held_pages", p.held_pages)
        .number("idle_units", p.idle_units)
        .number("spare_bytes", p.idle_units * unit_bytes + p.cached_bytes)
        .number("cached_bytes", p.cached_bytes)
        .number("commits", p.commits)
        .number("decommits", p.decommits)
        .number("sync_commits", p.sync_commits)
        .number("mapper_commits", p.mapper_commits)
        .number("mapper_decommits", p.mapper_decommits)
        .number("mapper_failures", p.mapper_failures)
        .number("waits", p.waits)
        .number("reclaims", p.reclaims)
        .number("awaiting_gpu_units", p.awaiting_gpu_units)
        .number("pending_fences", p.pending_fences)
        .number("fences", p.fences)
        .number("decommit_failures", p.decommit_failures)
        .number("retired_units", p.retired_units)
        .number("retired_bytes", p.retired_bytes)
        .number("driver_time_ns", static_cast<std::int64_t>(p.driver_time.count()))
        .end_object();
}

} // namespace detail

/// `s` as one JSON object: {"unix_ms", "budget"?, "process_budget"?, "pools": [{"name", "pool",
/// "cache"?, "model"?}]}. Byte counts are integers; names are escaped.
/// Throws: std::bad_alloc.
[[nodiscard]] inline std::string to_json(const stats_snapshot& s) {
    detail::json_writer w;
    w.begin_object().number("unix_ms", s.unix_ms);
    if (s.budget) {
        detail::write_json(w, "budget", *s.budget);
    }
    if (s.process_budget) {
        const process_budget_info& p = *s.process_budget;
        w.begin_object("process_budget")
            .string("name", p.name)
            .number("reclaimed", p.reclaimed)
            .number("reclaimed_records", p.reclaimed_records)
            .number("repairs", p.repairs)
            .number("max_models", p.max_models)
            .number("max_records", p.max_records);
        w.begin_array("usage");
        for (const auto& u : p.usage) {
            w.begin_object()
                .string("model", u.model)
                .number("pid", u.pid)
                .number("start_time", u.start_time)
                .number("committed", u.committed)
                .end_object();
        }
        w.end_array().end_object();
    }
    w.begin_array("pools");
    for (const auto& e : s.pools) {
        w.begin_object().string("name", e.name);
        detail::write_json(w, "pool", e.pool, e.unit_bytes);
        if (e.cache) {
            w.begin_object("cache")
                .number("sequences", e.cache->sequences)
                .number("used_blocks", e.cache->used_blocks)
                .number("free_blocks", e.cache->free_blocks)
                .number("block_bytes", e.cache->block_bytes)
                .number("cow_copies", e.cache->cow_copies)
                .boolean("asleep", e.cache->asleep)
                .end_object();
        }
        if (e.model) {
            detail::write_json(w, "model", *e.model);
        }
        w.end_object();
    }
    w.end_array().end_object();
    return w.str();
}

/// Reports `pool`'s spare bytes (idle units and kept handles: what it could give back at once)
/// to its quota when the quota takes reports (shared_budget, process_quota), so the budget's
/// statistics and vmmpp-budget show them. Call it where the engine exports its metrics (each
/// step, or each second). Returns the bytes reported.
/// Throws: what pool.stats() throws (std::system_error from its lock).
template <class Pool>
std::size_t report_spares(const Pool& pool) {
    const pool_stats s = pool.stats();
    const std::size_t spares = s.idle_units * pool.unit_bytes() + s.cached_bytes;
    if constexpr (requires { pool.quota().report_spares(spares); }) {
        pool.quota().report_spares(spares);
    }
    return spares;
}

} // namespace vmmpp
