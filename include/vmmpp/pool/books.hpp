// vmmpp/pool/books.hpp: an elastic_pool's books and its two paths to the backing. The
// books: which units are committed, held, idle or in flight (unit_table), how many holds each
// page has, what is charged to the quota. The paths: one commit path and one decommit path, which
// the pool's callers, room made under quota pressure, other models' reclaims and the pool's
// background agent (vmmpp/pool/agent.hpp) all take, and one order in which spares go back.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/fence_queue.hpp"
#include "vmmpp/pool/agent.hpp"
#include "vmmpp/detail/range_counts.hpp"
#include "vmmpp/detail/unit_table.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/growth/adaptive_extents.hpp"
#include "vmmpp/pool_config.hpp"

namespace vmmpp::detail {

/// Checks that cost a map lookup per call run in builds without NDEBUG (tests, debugging).
#ifdef NDEBUG
inline constexpr bool debug_checks = false;
#else
inline constexpr bool debug_checks = true;
#endif

/// A pool's state and the paths that change it. Used by elastic_pool and its agent only, which
/// hold `mutex` around every member function unless one says otherwise; its members are
/// public to them, not to users.
template <class Config>
class pool_books {
public:
    using backing_type = typename Config::backing_type;
    using growth_type = typename Config::growth_type;
    using quota_type = typename Config::quota_type;
    using mutex_type = typename Config::mutex_type;
    using clock = std::chrono::steady_clock;
    using agent_type = typename pool_agent_for<Config>::template type<pool_books>;
    static_assert(pool_agent<agent_type>, "vmmpp: a pool's agent does not model vmmpp::detail::pool_agent");
    /// Backing calls made outside `mutex` (by a background agent) serialise on this one.
    using backing_mutex_type = std::conditional_t<agent_type::calls_backing_unlocked, std::mutex, null_mutex>;
    /// Pools that other models' pressure can reclaim spares from (a single-threaded pool cannot
    /// be entered from another thread).
    static constexpr bool can_reclaim =
        growth_type::is_elastic && !std::is_same_v<mutex_type, null_mutex> && reclaiming_quota<quota_type>;

    pool_books(std::size_t capacity, typename backing_type::options backing_options, growth_type growth,
               quota_type quota)
        : backing(capacity, std::move(backing_options)),
          growth(std::move(growth)),
          quota(std::move(quota)),
          page_bytes(backing.granularity()),
          pages(backing.capacity() / page_bytes),
          unit_pages(std::min(this->growth.unit_pages(), pages)),
          units((pages + unit_pages - 1) / unit_pages),
          page_holds(pages, 0),
          table(units),
          fences(device_of(backing)),
          sizer(extent_sizer_for(this->growth, unit_pages * page_bytes)),
          agent(*this) {
        stats.reserved = backing.capacity();
    }
    pool_books(const pool_books&) = delete;
    pool_books& operator=(const pool_books&) = delete;

    // --- geometry (no lock needed) ---

    [[nodiscard]] std::size_t unit_of(std::size_t offset) const noexcept { return offset / (page_bytes * unit_pages); }
    [[nodiscard]] std::size_t last_unit_of(std::size_t offset, std::size_t bytes) const noexcept {
        return unit_of(offset + bytes - 1);
    }
    [[nodiscard]] std::size_t unit_offset(std::size_t u) const noexcept { return u * unit_pages * page_bytes; }
    [[nodiscard]] std::size_t unit_bytes(std::size_t u) const noexcept { return extent_bytes(u, 1); }
    /// Bytes of units [first, first + n).
    [[nodiscard]] std::size_t extent_bytes(std::size_t first, std::size_t n) const noexcept {
        return (std::min(pages, (first + n) * unit_pages) - first * unit_pages) * page_bytes;
    }
    [[nodiscard]] std::size_t extent_bytes_of(std::size_t first) const noexcept {
        return extent_bytes(first, table.extent_units[first]);
    }
    [[nodiscard]] bool in_span(std::size_t offset, std::size_t bytes) const noexcept {
        return bytes != 0 && offset < stats.reserved && bytes <= stats.reserved - offset;
    }
    /// check_range for each of `ranges`; the message is built only for one that fails.
    void check_ranges(const char* operation, std::span<const byte_range> ranges) const {
        for (const byte_range& r : ranges) {
            if (!in_span(r.offset, r.bytes)) [[unlikely]] {
                check_range(operation, r.offset, r.bytes);
            }
        }
    }
    void check_range(const char* operation, std::size_t offset, std::size_t bytes) const {
        if (!in_span(offset, bytes)) {
            throw invalid_argument(std::string(operation) + " of [" + std::to_string(offset) + ", +" +
                                   std::to_string(bytes) + "): empty or beyond the pool's capacity " +
                                   std::to_string(stats.reserved) + " bytes");
        }
    }
    /// retired_memory for the first retired unit of [first, last].
    void refuse_retired(std::size_t first, std::size_t last) const {
        for (std::size_t u = first; u <= last; ++u) {
            if (table.state[u] == unit_state::retired) {
                throw retired_memory(unit_offset(u), unit_bytes(u));
            }
        }
    }

    // --- holds ---

    /// The page of each offset of a batch met mostly in order, dividing only where an offset
    /// leaves the page of the one before: a prompt's 32 KiB pieces on 2 MiB pages divide once
    /// a page, not twice a piece.
    class page_cursor {
    public:
        explicit page_cursor(std::size_t page_bytes) noexcept : page_bytes_(page_bytes) {}
        std::size_t operator()(std::size_t offset) noexcept {
            if (offset - start_ >= page_bytes_) {  // below start_ too: the difference wraps
                page_ = offset / page_bytes_;
                start_ = page_ * page_bytes_;
            }
            return page_;
        }

    private:
        std::size_t page_bytes_;
        std::size_t page_ = 0;
        std::size_t start_ = 0;
    };

    /// One more hold on every page of each range of `ranges` (all committed): a page under k of
    /// them gets k holds, as from one call per range. Throws bad_alloc (debug builds) with
    /// nothing changed.
    void hold_pages(std::span<const byte_range> ranges) {
        if constexpr (debug_checks) {
            add_range_holds(ranges);  // so that a double release is caught even on a shared page
        }
        page_cursor page_of(page_bytes);
        for (const byte_range& r : ranges) {
            const std::size_t first_page = page_of(r.offset);
            const std::size_t last_page = page_of(r.offset + r.bytes - 1);
            for (std::size_t p = first_page; p <= last_page; ++p) {
                if (page_holds[p]++ == 0) {
                    ++held_pages;
                    const std::size_t u = p / unit_pages;
                    if (table.held_pages[u]++ == 0) {
                        forget_idle(u);
                        agent.on_taken(u);
                    }
                }
            }
        }
    }
    /// One hold fewer on every page of each range of `ranges`, in order, its memory to go back
    /// only after every fence of `after`; units nothing holds any more become spares (none goes
    /// back yet). Throws invalid_argument at the first range not held (the ones before it
    /// released, it and the rest not), bad_alloc.
    void release_pages(std::span<const byte_range> ranges, std::span<const pool_fence> after) {
        page_cursor page_of(page_bytes);
        std::size_t fenced = units;  // the unit `after` went to last: a unit's pieces add it once
        for (const byte_range& r : ranges) {
            const std::size_t first_page = page_of(r.offset);
            const std::size_t last_page = page_of(r.offset + r.bytes - 1);
            for (std::size_t p = first_page; p <= last_page; ++p) {
                if (page_holds[p] == 0) {
                    throw invalid_argument("release of [" + std::to_string(r.offset) + ", +" + std::to_string(r.bytes) +
                                           "): the page at offset " + std::to_string(p * page_bytes) +
                                           " is not held (released twice?)");
                }
            }
            if constexpr (debug_checks) {
                if (!range_holds.covers(r.offset, r.bytes)) {
                    throw invalid_argument("release of [" + std::to_string(r.offset) + ", +" + std::to_string(r.bytes) +
                                           "): part of that range is not held (released twice?)");
                }
            }
            // A fence more than needed only delays a give-back: added first, as they may allocate.
            if (!after.empty()) {
                for (std::size_t u = first_page / unit_pages; u <= last_page / unit_pages; ++u) {
                    if (u != fenced) {
                        for (const pool_fence& f : after) {
                            table.fences[u].add(fence{f.lane, f.value});
                        }
                        fenced = u;
                    }
                }
            }
            if constexpr (debug_checks) {
                range_holds.remove(r.offset, r.bytes);
            }
            for (std::size_t p = first_page; p <= last_page; ++p) {
                if (--page_holds[p] == 0) {
                    --held_pages;
                    const std::size_t u = p / unit_pages;
                    if (--table.held_pages[u] == 0) {
                        make_idle(u);
                    }
                }
            }
        }
    }

    // --- the quota ---

    void charge(std::size_t bytes) {
        quota.acquire(bytes);
        charged += bytes;
    }
    void uncharge(std::size_t bytes) noexcept {
        if (bytes > 0) {
            charged -= bytes;
            quota.release(bytes);
        }
    }
    /// Charges `bytes`; when the quota refuses, makes room and tries again: first with this
    /// pool's own spares and kept handles (outside `keep`) or, failing that, the other models'
    /// spares; then once more with the other models' spares; then, with a quota that lends
    /// cached blocks (cache_reclaiming_quota), with other models' cached blocks, a few rounds at
    /// most; last, with a quota shared by processes (process_quota), by asking the other
    /// processes for theirs (their spares, then their cached blocks).
    void charge_making_room(std::size_t bytes, unit_span keep) {
        constexpr int cache_rounds = 4;  // each evicts about the shortfall: more is a sign of a race
        for (int attempt = 0;; ++attempt) {
            try {
                charge(bytes);
                return;
            } catch (const over_quota&) {
                const bool made_room =
                    (attempt == 0 && give_back_spares(keep) > 0) || (attempt < 2 && reclaim_from_other_models() > 0) ||
                    (attempt < 2 + cache_rounds && reclaim_cached_from_other_models(bytes) > 0);
                if (!made_room) {
                    if constexpr (requires { quota.acquire_asking_processes(bytes); }) {
                        quota.acquire_asking_processes(bytes);  // throws over_quota as charge did
                        charged += bytes;
                        return;
                    } else {
                        throw;
                    }
                }
            }
        }
    }
    std::size_t reclaim_from_other_models() noexcept {
        if constexpr (can_reclaim) {
            return quota.reclaim_from_others();
        } else {
            return 0;
        }
    }
    /// Asks other models to evict cached blocks for a charge of `bytes` (never this pool's own:
    /// its owner is the caller, or a thread holding it).
    std::size_t reclaim_cached_from_other_models(std::size_t bytes) noexcept {
        if constexpr (can_reclaim && cache_reclaiming_quota<quota_type>) {
            return quota.reclaim_cached_from_others(bytes);
        } else {
            return 0;
        }
    }
    /// What prepay charged for this thread's commits and they have not drawn yet.
    [[nodiscard]] std::size_t prepaid_for_this_thread(std::size_t bytes) const noexcept {
        return prepaid_owner == std::this_thread::get_id() ? std::min(prepaid, bytes) : 0;
    }

    // --- the commit path ---

    /// How a commit may make room under quota pressure: it gives back spares outside `keep`
    /// (the units the same call commits). `make_room` false: a spare mapped ahead of demand
    /// never pushes other memory out.
    struct commit_terms {
        bool make_room = true;
        unit_span keep{};
    };

    /// The one commit path. Commits units [u, u + n) (uncommitted) as one extent, charged to the
    /// quota; when the quota or the device refuses all n, commits the `needed` first units only,
    /// making room for them as `terms` says (needed 0: then nothing). The `needed` units draw on
    /// this thread's prepaid charge first. With `unlock`, the pool's lock is released around the
    /// quota and driver calls, the units in flight (`committing`) meanwhile. Returns the units
    /// committed (recorded in the table, not idle yet, not held). Throws what the quota or the
    /// backing throws, nothing committed; with `unlock`, only with the lock held again.
    std::size_t commit(std::size_t u, std::size_t n, std::size_t needed, const commit_terms& terms,
                       std::unique_lock<mutex_type>* unlock = nullptr) {
        std::size_t made = 0;
        if (unlock == nullptr) {
            made = commit_charged(u, n, needed, terms, prepaid_for_this_thread(extent_bytes(u, needed)));
        } else {
            for (std::size_t a = u; a < u + n; ++a) {
                table.state[a] = unit_state::committing;
            }
            agent.commit_started(n);
            unlock->unlock();
            std::exception_ptr failure;
            try {
                made = commit_charged(u, n, needed, terms, 0);  // unlocked: never touches prepay's fields
            } catch (...) {
                failure = std::current_exception();
            }
            lock_spinning(*unlock);
            agent.commit_finished(n);
            for (std::size_t a = u; a < u + n; ++a) {
                table.state[a] = unit_state::uncommitted;  // note_committed marks the ones committed
            }
            if (failure) {
                std::rethrow_exception(failure);
            }
        }
        note_committed(u, made);
        return made;
    }

    /// Decommits the extent at `first` (idle, out of table.idle already), the one decommit path;
    /// returns the bytes uncharged. With `unlock`, the pool's lock is released around the driver
    /// call (the units `decommitting` meanwhile). If the backing fails, the extent becomes spares
    /// again or is retired (settle_failed_decommit) and the error propagates.
    std::size_t decommit(std::size_t first, std::unique_lock<mutex_type>* unlock = nullptr) {
        if (unlock != nullptr) {
            set_extent_state(first, unit_state::decommitting);
            unlock->unlock();
        }
        std::size_t freed = 0;
        std::exception_ptr failure;
        bool still_committed = true;
        {
            std::lock_guard backing_lock(backing_mutex);
            const std::size_t backing_before = backing.committed_bytes();  // to tell what a failure left
            try {
                freed = backing_decommit(first);
            } catch (...) {
                failure = std::current_exception();
                still_committed = backing.committed_bytes() == backing_before;
            }
        }
        if (unlock != nullptr) {
            lock_spinning(*unlock);
        }
        if (failure) {
            settle_failed_decommit(first, still_committed);
            std::rethrow_exception(failure);
        }
        note_decommitted(first);
        return freed;
    }

    /// Decommits the extents in `done` (committed by a failing call, held by nothing), newest first.
    void roll_back(std::vector<std::size_t>& done) noexcept {
        while (!done.empty()) {
            const std::size_t f = done.back();
            done.pop_back();
            if (table.state[f] != unit_state::committed || table.extent_first[f] != f) {
                continue;  // not this call's extent any more (given back meanwhile): nothing to undo
            }
            forget_extent_idle(f);
            try {
                (void)decommit(f);
            } catch (...) {
                // a spare again, or retired (decommit says which): accounted either way
            }
        }
    }

    // --- giving spares back: one order ---

    /// Gives back extents idle as a whole, whose GPU work is done and that lie outside `keep`,
    /// highest offset first (a lowest-first block allocator takes the low ones next), until at
    /// most `keep_idle` idle units remain; returns the bytes uncharged. `on_error` says what a
    /// failed decommit does: propagate (a caller's release), or go on with the next (room made
    /// for others). What stays waits for its fences, charged.
    enum class on_error { propagate, go_on };
    std::size_t give_back(std::size_t keep_idle, unit_span keep = {}, on_error errors = on_error::propagate) {
        std::size_t freed = 0;
        if constexpr (growth_type::is_elastic) {
            if (table.idle.size() <= keep_idle) {
                return 0;
            }
            try {
                poll_fences();
            } catch (...) {
                if (errors == on_error::propagate) {
                    throw;
                }  // a lost context: give back only what no fence holds
            }
            for (auto it = table.idle_extents.end(); table.idle.size() > keep_idle && it != table.idle_extents.begin();) {
                --it;
                const std::size_t f = *it;
                if (keep.overlaps(f, f + table.extent_units[f]) || !gpu_done_with_extent(f)) {
                    continue;
                }
                it = table.idle_extents.erase(it);
                forget_extent_idle(f);
                try {
                    freed += decommit(f);
                } catch (...) {
                    if (errors == on_error::propagate) {
                        throw;
                    }
                    // Spares again (back in idle_extents) or retired, counted in stats; go on
                    // below f, so that a spare that failed is not tried again in this call.
                    it = table.idle_extents.lower_bound(f);
                }
            }
        }
        return freed;
    }
    /// What the growth policy keeps idle after a release, given back beyond that.
    std::size_t give_back_beyond_keep() {
        return give_back(growth.idle_units_to_keep(table.committed, table.idle.size()));
    }
    /// Room for a commit: every spare outside `keep`, and the kept handles. Never throws.
    std::size_t give_back_spares(unit_span keep) noexcept {
        std::size_t freed = 0;
        try {
            freed = give_back(0, keep, on_error::go_on);
        } catch (...) {
            // go_on keeps every failure inside give_back: nothing arrives here
        }
        freed += drop_kept_handles();
        agent.stop_refilling();
        return freed;
    }
    /// Releases the backing's kept handles; returns the bytes uncharged.
    std::size_t drop_kept_handles() noexcept {
        std::lock_guard backing_lock(backing_mutex);
        const std::size_t freed = release_kept(backing);
        uncharge(freed);
        kept_snapshot = 0;
        return freed;
    }

    // --- fences ---

    /// Asks which fences completed (never waits). A fence whose work failed means the context is
    /// lost; the error propagates and the units behind it stay committed.
    void poll_fences() {
        if (fences.pending() > 0) {
            (void)fences.poll();
        }
    }
    /// Whether unit u's memory may go back: no GPU work queued before its releases is pending.
    [[nodiscard]] bool gpu_done_with(std::size_t u) const noexcept { return fences.is_complete(table.fences[u]); }
    [[nodiscard]] bool gpu_done_with_extent(std::size_t first) const noexcept {
        for (std::size_t u = first; u < first + table.extent_units[first]; ++u) {
            if (!gpu_done_with(u)) {
                return false;
            }
        }
        return true;
    }
    /// Whether an extent idle as a whole stays committed only because its GPU work is pending.
    [[nodiscard]] bool idle_memory_awaits_gpu() const noexcept {
        return std::any_of(table.idle_extents.begin(), table.idle_extents.end(),
                           [&](std::size_t f) { return !gpu_done_with_extent(f); });
    }

    // --- unit bookkeeping ---

    /// Committed unit u, held by nothing now, becomes a spare. Throws bad_alloc (nothing changed).
    void make_idle(std::size_t u) {
        const bool inserted = table.idle.insert(u).second;
        try {
            table.note_idle(u);
        } catch (...) {
            if (inserted) {
                table.idle.erase(u);
            }
            throw;
        }
        agent.on_idle(u);
    }
    /// Unit u is no spare any more (held again, or going back with its extent).
    void forget_idle(std::size_t u) noexcept {
        if (table.idle.erase(u) != 0) {
            table.note_not_idle(u);
        }
    }
    void forget_extent_idle(std::size_t first) noexcept {
        for (std::size_t u = first; u < first + table.extent_units[first]; ++u) {
            forget_idle(u);
        }
    }
    void set_extent_state(std::size_t first, unit_state state) noexcept {
        for (std::size_t u = first; u < first + table.extent_units[first]; ++u) {
            table.state[u] = state;
        }
    }

    // --- the state ---

    backing_type backing;
    growth_type growth;
    quota_type quota;
    mutable mutex_type mutex;
    mutable backing_mutex_type backing_mutex;
    const std::size_t page_bytes;
    const std::size_t pages;
    const std::size_t unit_pages;
    const std::size_t units;
    std::vector<std::uint32_t> page_holds;  // per page: how many holds
    unit_table table;                       // per unit: state, held pages, fences; the idle set
    fence_queue fences;
    range_counts range_holds;  // debug builds: holds per byte
    std::size_t held_pages = 0;
    std::atomic<std::size_t> charged{0};        // bytes acquired from the quota
    std::size_t prepaid = 0;                    // of charged: prepay's, not backing anything yet
    std::thread::id prepaid_owner{};            // the thread whose commits draw on prepaid
    std::atomic<std::size_t> kept_snapshot{0};  // the backing's kept handle bytes, after its last call
    std::atomic<std::int64_t> driver_ns{0};
    pool_stats stats;
    extent_sizer<clock> sizer;  // how many units the next commit covers (one, without extents)
    agent_type agent;           // last: it may start a thread that reads everything above

private:
    /// range_holds.add for each range, or (std::bad_alloc) none.
    void add_range_holds(std::span<const byte_range> ranges) {
        std::size_t added = 0;
        try {
            for (; added < ranges.size(); ++added) {
                range_holds.add(ranges[added].offset, ranges[added].bytes);
            }
        } catch (...) {
            while (added > 0) {
                --added;
                range_holds.remove(ranges[added].offset, ranges[added].bytes);
            }
            throw;
        }
    }
    /// commit's quota and backing calls; the caller holds `mutex` or has the units in flight.
    /// `prepaid_part`: what of the `needed` units this thread's prepay already charged (0 when
    /// called without the lock: prepaid is read and written under it only).
    std::size_t commit_charged(std::size_t u, std::size_t n, std::size_t needed, const commit_terms& terms,
                               std::size_t prepaid_part) {
        if (n > needed) {
            const std::size_t extra = extent_bytes(u, n) - prepaid_part;
            try {
                charge(extra);  // units ahead of demand never push other memory out
                try {
                    std::lock_guard backing_lock(backing_mutex);
                    backing_commit(u, n);
                } catch (...) {
                    uncharge(extra);
                    throw;
                }
                if (prepaid_part != 0) {
                    prepaid -= prepaid_part;
                }
                return n;
            } catch (const over_quota&) {
                if (needed == 0) {
                    throw;
                }
            } catch (const out_of_memory&) {
                if (needed == 0) {
                    throw;
                }
            }
        }
        const std::size_t rest = extent_bytes(u, needed) - prepaid_part;
        if (rest > 0) {
            if (terms.make_room) {
                charge_making_room(rest, terms.keep);
            } else {
                charge(rest);
            }
        }
        try {
            std::lock_guard backing_lock(backing_mutex);
            backing_commit(u, needed);
        } catch (...) {
            uncharge(rest);
            throw;
        }
        if (prepaid_part != 0) {
            prepaid -= prepaid_part;
        }
        return needed;
    }

    template <class F>
    void timed(F&& f) {
        const auto start = clock::now();
        struct add_time {
            std::atomic<std::int64_t>& total;
            clock::time_point start;
            ~add_time() { total += (clock::now() - start).count(); }
        } add{driver_ns, start};
        std::forward<F>(f)();
    }
    /// Commits units [first, first + n) as one extent, already charged to the quota; a reused
    /// kept handle was charged while kept, so its second charge goes back. Strong guarantee.
    void backing_commit(std::size_t first, std::size_t n) {
        // Kept handles that left the backing's cache, whether the commit mapped them or failed
        // and released them, are no longer charged as kept: settle that on both paths.
        struct settle_kept {
            pool_books& books;
            std::size_t before;
            ~settle_kept() {
                const std::size_t after = kept_bytes_of(books.backing);
                books.uncharge(before > after ? before - after : 0);
                books.kept_snapshot = after;
            }
        } settle{*this, kept_bytes_of(backing)};
        timed([&] { backing.commit(unit_offset(first), extent_bytes(first, n)); });
    }
    /// Decommits the extent at `first`, gives the quota back what left the device (a handle the
    /// backing keeps for reuse stays charged); returns the bytes uncharged.
    std::size_t backing_decommit(std::size_t first) {
        const std::size_t kept_before = kept_bytes_of(backing);
        const std::size_t bytes = extent_bytes_of(first);
        timed([&] { backing.decommit(unit_offset(first), bytes); });
        const std::size_t freed = bytes - (kept_bytes_of(backing) - kept_before);
        uncharge(freed);
        kept_snapshot = kept_bytes_of(backing);
        return freed;
    }

    void note_committed(std::size_t first, std::size_t n) {
        if (n == 0) {
            return;
        }
        table.set_extent(first, n);
        set_extent_state(first, unit_state::committed);
        table.committed += n;
        ++stats.commits;
        table.extent_commit[first] = stats.commits;
        stats.committed += extent_bytes(first, n);
        stats.peak_committed = std::max(stats.peak_committed, stats.committed);
    }
    void note_decommitted(std::size_t first) {
        sizer.gave_back();
        for (std::size_t u = first; u < first + table.extent_units[first]; ++u) {
            table.fences[u].clear();  // its memory is gone: nothing to wait for any more
        }
        set_extent_state(first, unit_state::uncommitted);
        table.committed -= table.extent_units[first];
        ++stats.decommits;
        stats.committed -= extent_bytes_of(first);
    }
    /// After the backing threw from decommitting the extent at `first`: if the backing still has
    /// all of it committed, nothing was given back and its units are spares again, to be tried
    /// again later; otherwise part of it went and it is retired: it may still be mapped, so it is
    /// never mapped, handed out or decommitted again, and stays charged.
    void settle_failed_decommit(std::size_t first, bool still_committed) {
        ++stats.decommit_failures;
        if (still_committed) {
            set_extent_state(first, unit_state::committed);
            for (std::size_t u = first; u < first + table.extent_units[first]; ++u) {
                make_idle(u);
            }
            return;
        }
        set_extent_state(first, unit_state::retired);
        table.committed -= table.extent_units[first];
        stats.committed -= extent_bytes_of(first);
        stats.retired_units += table.extent_units[first];
        stats.retired_bytes += extent_bytes_of(first);
    }
};

} // namespace vmmpp::detail
