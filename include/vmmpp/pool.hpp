// vmmpp/pool.hpp: elastic_pool<Config>: one reserved span whose physical memory follows what is
// held in it. Callers hold byte ranges (a KV block, say); the pool commits the pages under them
// through the backing, charged to the quota, in units the growth policy chooses, and gives
// pages back when nothing holds them any more. Its books and its one commit and decommit path:
// vmmpp/pool/books.hpp; what works on it in the background: vmmpp/pool/agent.hpp.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "vmmpp/pool/books.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/pool_config.hpp"

namespace vmmpp {

/// An elastic pool over one backing.
///
/// Thread safety: every member function may be called concurrently from any threads; they
/// serialise on `Config::mutex_type` (the driver serialises VMM calls anyway).
/// `base()`, `capacity()` and `page_bytes()` never change and take no lock.
///
/// Background work: a pool's agent (vmmpp/pool/agent.hpp) works on it off the caller's
/// thread. With a growth policy that models background_growth_policy (mapped_ahead), that is a
/// mapper thread that commits spare units ahead of demand and gives idle ones
/// back lazily (see vmmpp/growth/mapped_ahead.hpp). A unit being mapped or unmapped by it is
/// "in flight": a caller that needs it waits for it rather than mapping it twice. The mapper
/// calls the backing outside the pool's lock, so callers that find their memory committed never
/// wait for the driver. The quota must then be thread safe (all of vmmpp's are).
///
/// Quota accounting is exact: the pool charges committed units plus handles its backing keeps
/// for reuse (vmm_options::max_cached_handles). Under quota pressure it gives back its own
/// spares and kept handles first, then asks the other models of a shared budget for theirs.
///
/// Stream order: the driver unmaps at once, even under a kernel or copy still queued, and that
/// work then faults and takes the process's CUDA context with it. So memory is given back only
/// after the GPU work that may touch it has completed: `release(offset, bytes, stream)` (or
/// fences from `record_fence`) records an event on that stream, and units released after it stay
/// committed and charged until every fence they were released after has completed (fences on one
/// stream complete in order; streams do not wait for each other). The caller's thread never waits
/// for the GPU: the memory goes back when the GPU gets there, on the release agent's thread
/// (vmmpp/detail/release_agent.hpp) or the mapper's, or on a later call (release, collect, trim,
/// budget pressure). `release(offset, bytes)` without a stream says no queued work touches the range.
///
/// Failures: when the backing refuses a decommit (cuMemUnmap or cuMemRelease failed) and reports
/// the unit still committed, it stays a committed spare, usable, still charged, and a later
/// release or trim tries again. When the backing gave part of it back before failing (an unmap
/// done, a release refused), the unit is retired: it may still hold device memory, so it stays
/// charged and is never mapped, handed out or given back again; a hold of its range throws
/// vmmpp::retired_memory. stats() counts both (decommit_failures, retired_units).
template <class Config>
class elastic_pool {
public:
    using config = Config;
    using backing_type = typename Config::backing_type;
    using growth_type = typename Config::growth_type;
    using quota_type = typename Config::quota_type;
    using mutex_type = typename Config::mutex_type;
    /// Whether this pool runs a background mapper thread.
    static constexpr bool has_mapper = background_growth_policy<growth_type>;
    /// Whether a commit may cover several units (the growth policy models extent_growth_policy).
    static constexpr bool commits_extents = extent_growth_policy<growth_type>;

    /// Builds the backing with `capacity` bytes (a multiple of its granularity). A pool whose
    /// growth policy is not elastic commits the whole span here, charged to the quota.
    explicit elastic_pool(std::size_t capacity, typename backing_type::options backing_options = {},
                          growth_type growth = {}, quota_type quota = {})
        : b_(capacity, std::move(backing_options), std::move(growth), std::move(quota)) {
        if constexpr (!growth_type::is_elastic) {
            (void)commit_range(0, b_.units - 1, commit_mode::for_holds);
            for (std::size_t u = 0; u < b_.units; ++u) {
                b_.make_idle(u);
            }
        }
        if constexpr (books::can_reclaim) {
            b_.quota.set_reclaimer([this] { return give_back_for_others(); });
        }
        b_.agent.start();  // last: everything it reads exists
    }
    elastic_pool(const elastic_pool&) = delete;
    elastic_pool& operator=(const elastic_pool&) = delete;

    /// Stops the agent (a mapper finishes the unit in flight), then gives every committed unit
    /// and kept handle back, to the backing and the quota.
    ~elastic_pool() {
        b_.agent.stop();
        if constexpr (books::can_reclaim) {
            b_.quota.clear_reclaimer();
        }
        try {
            b_.fences.wait_all();  // never unmap under queued work, even at the end
        } catch (...) {
            // the work failed (a lost context): nothing on the GPU can use the memory any more
        }
        for (std::size_t u = 0; u < b_.units; ++u) {
            const auto state = b_.table.state[u];
            const bool backed = state == detail::unit_state::committed || state == detail::unit_state::retired;
            if (backed && b_.table.extent_first[u] == u) {
                try {
                    b_.backing.decommit(b_.unit_offset(u), b_.extent_bytes_of(u));
                } catch (...) {
                    // The backing frees everything in its own destructor; only the quota matters here.
                }
            }
        }
        (void)release_kept(b_.backing);
        b_.quota.release(b_.charged.load());
    }

    /// Holds [offset, offset+bytes): commits every page under it that is not committed yet.
    /// The range need not be page aligned; pages are held by count, so ranges may share pages.
    /// Throws: invalid_argument (range outside the pool), retired_memory, over_quota,
    /// out_of_memory, cuda_error.
    /// Guarantee: strong; every unit this call committed is decommitted again and nothing is
    /// held. Except: spares the pool gave back to make room under quota pressure stay given back.
    /// Waits: for a unit the mapper has in flight; for the driver when it commits.
    void ensure_committed(std::size_t offset, std::size_t bytes) {
        const byte_range range{offset, bytes};
        ensure_committed(std::span<const byte_range>(&range, 1));
    }

    /// Holds every range of `ranges` as ensure_committed(offset, bytes) would one after the other,
    /// under one lock: a page under k of the ranges gets k holds, which k releases give back (one
    /// per range, or release(ranges, ...)). What kv_cache does with all the pieces of the blocks
    /// an append takes, sorted by offset: ranges that touch the ones before them form a run whose
    /// units are checked, and committed if need be, as one range (the growth policy's extents
    /// then span the run, as commit_ahead's do), and the holds cost a division per page, not
    /// per range.
    /// Throws: as ensure_committed. Guarantee: strong for the whole batch: on throw no range is
    /// held, every unit this call committed is decommitted again and the growth policy's pace
    /// is as before (spares given back to make room stay given back, as for one range).
    /// Waits: as ensure_committed, before anything is committed or held.
    void ensure_committed(std::span<const byte_range> ranges) {
        b_.check_ranges("ensure_committed", ranges);
        std::unique_lock lock(b_.mutex);
        // First, with the lock released while waiting, until no unit under any range is in
        // flight (the mapper's: no other agent calls the backing without the lock): from then on
        // the lock stays held, so no unit a run found committed goes back before its holds, and
        // nothing this call committed is taken by another caller before a rollback.
        if constexpr (books::agent_type::calls_backing_unlocked) {
            while (any_in_flight(ranges)) {
                ++b_.stats.waits;  // the mapper is mapping or unmapping one of them: never map twice
                b_.agent.wait_for_in_flight(lock);
            }
        }
        const auto sizer_before = b_.sizer;
        std::vector<std::size_t> done;  // extents committed here, undone if a run fails
        std::size_t held = 0;           // ranges held, the runs before the one in progress
        try {
            while (held < ranges.size()) {
                const range_run run = run_at(ranges, held);
                b_.refuse_retired(run.first_unit, run.last_unit);
                if (!all_committed(run.first_unit, run.last_unit)) {  // the common case allocates nothing
                    b_.stats.sync_commits += commit_range(run.first_unit, run.last_unit, commit_mode::for_holds, &done);
                    b_.agent.on_missed();
                }
                b_.hold_pages(ranges.subspan(held, run.end - held));  // strong
                held = run.end;
            }
        } catch (...) {
            while (held > 0) {
                --held;
                try {
                    b_.release_pages(ranges.subspan(held, 1), {});
                } catch (...) {
                    // std::bad_alloc listing a spare: released, the unit stays committed (counted)
                }
            }
            b_.roll_back(done);
            b_.sizer = sizer_before;  // after the rollback's decommits, which are no churn
            throw;
        }
    }

    /// Lets go of [offset, offset+bytes), held before with ensure_committed, when no GPU work
    /// queued now may still touch it (otherwise pass the stream, below). Pages nothing holds any
    /// more go back as the growth policy says (with a background mapper: later, on its thread).
    /// Releasing a range that is not held (a double release) is an invalid_argument and changes
    /// nothing: exactly in builds without NDEBUG, otherwise when no other range holds the page.
    /// Throws: invalid_argument (not held, outside the pool; nothing changed); cuda_error when the
    /// backing fails to decommit (the release has taken effect; the unit stays a spare or is
    /// retired, see the class comment).
    void release(std::size_t offset, std::size_t bytes) { release(offset, bytes, pool_fence{}); }

    /// As release(offset, bytes), for memory that work queued on `stream` may still touch: the
    /// pages go back only once that work has completed. Records a fence on `stream` (an event:
    /// the caller's thread does not wait for the GPU). Throws: as release(offset, bytes), and
    /// cuda_error when the event cannot be recorded (then nothing was released).
    void release(std::size_t offset, std::size_t bytes, cudaStream_t stream) {
        b_.check_range("release", offset, bytes);
        release(offset, bytes, record_fence(stream));
    }

    /// As release(offset, bytes), with the pages going back only once `after` has completed. One
    /// fence can order many releases (kv_cache records one per free or truncate). Throws: as
    /// release(offset, bytes), and invalid_argument for a fence this pool never recorded.
    void release(std::size_t offset, std::size_t bytes, pool_fence after) {
        const byte_range range{offset, bytes};
        release(std::span<const byte_range>(&range, 1), std::span<const pool_fence>(&after, 1));
    }
    void release(std::span<const byte_range> ranges, pool_fence after) {
        release(ranges, std::span<const pool_fence>(&after, 1));
    }

    /// Releases every range of `ranges` (each held before), to go back once every fence of
    /// `after` has completed (memory read on several streams waits for a fence on each), under
    /// one lock and with one give-back at the end: what kv_cache's free and truncate use for all
    /// the pieces of the blocks they drop. Ranges are checked one by one: at the first one not
    /// held the call throws invalid_argument with the earlier ones released. A fence this pool
    /// did not record (another pool's, say) is an invalid_argument, and nothing is released.
    void release(std::span<const byte_range> ranges, std::span<const pool_fence> after) {
        b_.check_ranges("release", ranges);
        std::lock_guard lock(b_.mutex);
        for (const pool_fence& f : after) {
            check_fence("release", f);
        }
        b_.release_pages(ranges, after);
        (void)b_.give_back_beyond_keep();  // nothing, with a mapper: it gives spares back later
        b_.agent.after_release(after);
    }

    /// Records a fence after the work queued on `stream` so far, for release(offset, bytes,
    /// fence): e.g. one fence for every block a step frees. Host memory needs none (returns the
    /// empty fence). The caller's thread does not wait. Throws: cuda_error (nothing recorded).
    [[nodiscard]] pool_fence record_fence(cudaStream_t stream) {
        std::lock_guard lock(b_.mutex);
        const detail::fence f = b_.fences.record(stream);
        b_.stats.fences += f.seq != 0 ? 1 : 0;
        return f.seq == 0 ? pool_fence{} : pool_fence{id_, f.lane, f.seq};
    }

    /// Whether the GPU work before every fence of `fences` has completed (asks the driver, never
    /// waits). Throws: invalid_argument for a fence this pool did not record; cuda_error.
    [[nodiscard]] bool is_complete(std::span<const pool_fence> fences) {
        std::lock_guard lock(b_.mutex);
        bool polled = false;
        for (const pool_fence& f : fences) {
            check_fence("is_complete", f);
            if (!b_.fences.is_complete(detail::fence{f.lane, f.value}) && !std::exchange(polled, true)) {
                b_.fences.poll();
            }
            if (!b_.fences.is_complete(detail::fence{f.lane, f.value})) {
                return false;
            }
        }
        return true;
    }

    /// Makes `stream` wait for the work before each fence of `fences` that has not completed
    /// (cuStreamWaitEvent), so that work queued there afterwards, a write into memory those
    /// fences guard, runs after it, and drops the fences that have completed from `fences`. The
    /// caller's thread does not wait. Throws: invalid_argument for a fence this pool did not
    /// record (nothing done); cuda_error (fences dropped only if complete).
    void make_wait(cudaStream_t stream, std::vector<pool_fence>& fences) {
        std::lock_guard lock(b_.mutex);
        for (const pool_fence& f : fences) {
            check_fence("make_wait", f);
        }
        b_.fences.poll();
        std::erase_if(fences, [&](const pool_fence& f) { return b_.fences.is_complete(detail::fence{f.lane, f.value}); });
        for (const pool_fence& f : fences) {
            b_.fences.make_wait(stream, detail::fence{f.lane, f.value});
        }
    }

    /// Gives back, as the growth policy says, units whose release waited for GPU work that has
    /// completed since; never waits. Returns the bytes given back. Every release, trim and
    /// budget reclaim does this too; call it when the engine frees nothing for a while.
    /// Throws: cuda_error when the driver fails (a fenced work's failure, a decommit).
    std::size_t collect() {
        std::lock_guard lock(b_.mutex);
        b_.poll_fences();
        return b_.give_back_beyond_keep();  // 0 with a mapper: it gives spares back after release_delay
    }

    /// Waits until the GPU work behind every fence recorded so far has completed (blocking the
    /// caller, as cudaFree would), then collects. Returns the bytes given back.
    /// Throws: cuda_error, as collect.
    std::size_t synchronize() {
        {
            std::lock_guard lock(b_.mutex);
            b_.fences.wait_all();
        }
        return collect();
    }

    /// Gives back every committed unit nothing holds, spares included, and every kept handle
    /// (e.g. when another model needs the budget). Units the mapper has in flight finish on its
    /// thread; units whose GPU work is still queued stay. Returns the bytes this call gave back
    /// to the quota. A preallocated pool gives nothing back. Throws: cuda_error, as collect.
    std::size_t trim() {
        std::lock_guard lock(b_.mutex);
        b_.agent.stop_refilling();
        b_.poll_fences();
        const std::size_t freed = b_.give_back(0);
        return freed + b_.drop_kept_handles();
    }

    /// A hint that [offset, offset+bytes) will be needed soon: a background mapper maps the units
    /// there (and then the ones after them) into its spares. Without a mapper it does nothing.
    /// kv_cache gives this hint for the first block of each of its regions.
    /// Throws: invalid_argument for a range outside the pool. Thread safety: any thread.
    void will_need(std::size_t offset, std::size_t bytes) {
        b_.check_range("will_need", offset, bytes);
        std::lock_guard lock(b_.mutex);
        b_.agent.will_need(b_.unit_of(offset), b_.last_unit_of(offset, bytes));
    }

    /// What prepay charged ahead of a caller's commits: while it lives, commits on the thread
    /// that made it (ensure_committed, commit_ahead) draw on it rather than on the quota; its end
    /// gives back what they left. Move-only.
    class prepaid_charge {
    public:
        prepaid_charge() noexcept = default;
        prepaid_charge(prepaid_charge&& other) noexcept : pool_(std::exchange(other.pool_, nullptr)) {}
        prepaid_charge& operator=(prepaid_charge&&) = delete;
        ~prepaid_charge() {
            if (pool_ != nullptr) {
                pool_->end_prepaid();
            }
        }
        /// The bytes prepay charged (0: nothing was uncommitted, or another thread's prepay runs).
        [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

    private:
        friend class elastic_pool;
        prepaid_charge(elastic_pool* pool, std::size_t bytes) noexcept : pool_(pool), bytes_(bytes) {}
        elastic_pool* pool_ = nullptr;
        std::size_t bytes_ = 0;
    };

    /// Charges the quota once, now, for every uncommitted unit under `ranges` (making room as a
    /// commit does: this pool's spares outside them, then the other models'), so that a caller
    /// about to commit several ranges (kv_cache::append) is refused before any backing call
    /// rather than after committing up to the limit and rolling back. The commits that follow on
    /// this thread draw on the charge while the returned object lives. Units the mapper has in
    /// flight are not counted (it charges for them). While another thread's prepay lives it
    /// charges nothing and returns an empty one (commits then charge one by one, as without it).
    /// Throws: invalid_argument (a range outside the pool), retired_memory, over_quota (its
    /// requested() is the bytes all of `ranges` need), std::bad_alloc. Nothing charged on throw,
    /// except that spares given back to make room stay given back.
    [[nodiscard]] prepaid_charge prepay(std::span<const byte_range> ranges) {
        b_.check_ranges("prepay", ranges);
        std::lock_guard lock(b_.mutex);
        if (b_.prepaid_owner != std::thread::id{}) {
            return {};
        }
        std::vector<std::size_t> units;  // uncommitted units under the ranges, each once
        for (const byte_range& r : ranges) {
            const std::size_t first = b_.unit_of(r.offset);
            const std::size_t last = b_.last_unit_of(r.offset, r.bytes);
            b_.refuse_retired(first, last);
            for (std::size_t u = first; u <= last; ++u) {
                if (b_.table.state[u] == detail::unit_state::uncommitted) {
                    units.push_back(u);
                }
            }
        }
        std::sort(units.begin(), units.end());
        units.erase(std::unique(units.begin(), units.end()), units.end());
        std::size_t bytes = 0;
        for (std::size_t u : units) {
            bytes += b_.unit_bytes(u);
        }
        if (bytes == 0) {
            return {};
        }
        b_.charge_making_room(bytes, span_of(ranges));
        b_.prepaid = bytes;
        b_.prepaid_owner = std::this_thread::get_id();
        return {this, bytes};
    }

    /// Commits every uncommitted unit under `ranges` now, as spares, in as few extents as the
    /// growth policy allows (with adaptive_extents: runs of up to max_extent_pages, one handle
    /// each), so the holds that follow find them committed. What kv_cache does for the blocks
    /// of one append: a prompt's blocks then share extents, which empty when its sequence ends.
    /// Units in flight are left to the mapper.
    /// Throws: as ensure_committed. Guarantee: strong (nothing stays committed on failure).
    void commit_ahead(std::span<const byte_range> ranges) {
        b_.check_ranges("commit_ahead", ranges);
        std::lock_guard lock(b_.mutex);
        for (const byte_range& r : ranges) {
            b_.refuse_retired(b_.unit_of(r.offset), b_.last_unit_of(r.offset, r.bytes));
        }
        // Room made under quota pressure never takes what this call committed: keep all of it.
        const detail::unit_span keep = span_of(ranges);
        std::vector<std::size_t> done;  // extents committed by earlier ranges, for the rollback
        try {
            for (const byte_range& r : ranges) {
                b_.stats.sync_commits += commit_range(b_.unit_of(r.offset), b_.last_unit_of(r.offset, r.bytes),
                                                      commit_mode::ahead, &done, keep);
            }
        } catch (...) {
            b_.roll_back(done);
            throw;
        }
    }

    [[nodiscard]] std::byte* base() const noexcept { return b_.backing.base(); }
    [[nodiscard]] std::size_t capacity() const noexcept { return b_.stats.reserved; }
    /// The backing's granularity: the unit pages are held and counted in.
    [[nodiscard]] std::size_t page_bytes() const noexcept { return b_.page_bytes; }
    /// Bytes one growth step commits.
    [[nodiscard]] std::size_t unit_bytes() const noexcept { return b_.unit_pages * b_.page_bytes; }

    /// The CUDA device of the memory, or -1 for host memory.
    [[nodiscard]] int device() const noexcept { return device_of(b_.backing); }
    /// Number of growth units the span is cut into, and whether unit `u` is committed now:
    /// the committed regions an engine registers with an RDMA library.
    [[nodiscard]] std::size_t unit_count() const noexcept { return b_.units; }
    [[nodiscard]] bool is_unit_committed(std::size_t u) const {
        std::lock_guard lock(b_.mutex);
        return u < b_.units && b_.table.state[u] == detail::unit_state::committed;
    }
    /// Byte offset and length of unit `u` within the span.
    [[nodiscard]] std::size_t unit_offset_of(std::size_t u) const noexcept { return b_.unit_offset(u); }
    [[nodiscard]] std::size_t unit_bytes_of(std::size_t u) const noexcept { return b_.unit_bytes(u); }

    [[nodiscard]] std::size_t committed_bytes() const {
        std::lock_guard lock(b_.mutex);
        return b_.stats.committed;
    }
    /// The committed extents, lowest offset first: each is what one backing commit mapped (one
    /// physical handle on the vmm backing), the regions a transfer engine registers, since NIXL
    /// and UCX export and import a handle whole (vmmpp/interop/nixl.hpp).
    [[nodiscard]] std::vector<committed_extent> committed_extents() const {
        std::lock_guard lock(b_.mutex);
        std::vector<committed_extent> out;
        for (std::size_t u = 0; u < b_.units;) {
            if (b_.table.state[u] != detail::unit_state::committed || b_.table.extent_first[u] != u) {
                ++u;  // uncommitted, retired or on its way (the mapper's): not memory to hand out
                continue;
            }
            out.push_back({b_.unit_offset(u), b_.extent_bytes_of(u), b_.table.extent_commit[u]});
            u += b_.table.extent_units[u];
        }
        return out;
    }
    /// Whether every page under [offset, offset+bytes) is committed.
    [[nodiscard]] bool is_committed(std::size_t offset, std::size_t bytes) const {
        b_.check_range("is_committed", offset, bytes);
        std::lock_guard lock(b_.mutex);
        for (std::size_t p = offset / b_.page_bytes; p <= (offset + bytes - 1) / b_.page_bytes; ++p) {
            if (b_.table.state[p / b_.unit_pages] != detail::unit_state::committed) {
                return false;
            }
        }
        return true;
    }
    [[nodiscard]] pool_stats stats() const {
        std::lock_guard lock(b_.mutex);
        pool_stats s = b_.stats;
        s.held_pages = b_.held_pages;
        s.idle_units = b_.table.idle.size();
        s.charged = b_.charged.load();
        s.cached_bytes = b_.kept_snapshot.load();
        s.driver_time = std::chrono::nanoseconds(b_.driver_ns.load());
        s.pending_fences = b_.fences.pending();
        if (b_.fences.pending() > 0) {  // otherwise every fence has completed
            b_.table.idle.for_each([&](std::size_t u) { s.awaiting_gpu_units += b_.gpu_done_with(u) ? 0 : 1; });
        }
        return s;
    }

    /// The quota this pool charges (e.g. to read a shared_budget's statistics).
    [[nodiscard]] const quota_type& quota() const noexcept { return b_.quota; }
    /// The backing, for what only it knows (a vmm backing's handle count, say). With a
    /// background mapper the backing changes under the caller: use with_backing.
    [[nodiscard]] const backing_type& backing() const noexcept { return b_.backing; }
    /// Calls f(backing) with the pool and its backing locked, so no commit runs meanwhile
    /// (e.g. to export the handles of a pool that maps in the background).
    template <class F>
    decltype(auto) with_backing(F&& f) const {
        std::lock_guard lock(b_.mutex);
        std::lock_guard backing_lock(b_.backing_mutex);
        return std::forward<F>(f)(b_.backing);
    }

private:
    using books = detail::pool_books<Config>;
    using clock = typename books::clock;

    static std::uint64_t next_pool_id() noexcept {
        static std::atomic<std::uint64_t> last{0};
        return ++last;
    }

    /// invalid_argument unless `f` is no fence or one this pool recorded. The caller holds the lock.
    void check_fence(const char* operation, const pool_fence& f) const {
        if (f.value != 0 && (f.pool != id_ || !b_.fences.recorded(detail::fence{f.lane, f.value}))) {
            throw invalid_argument(std::string(operation) + " with fence " + std::to_string(f.value) + " of lane " +
                                   std::to_string(f.lane) + (f.pool != id_ ? " recorded by another pool (pool " +
                                   std::to_string(f.pool) + ", this is pool " + std::to_string(id_) + ")"
                                                           : ": this pool never recorded it"));
        }
    }
    /// Ranges [begin, end) of a batch, each starting inside or right after the ones before it
    /// (a prompt's pieces of one tensor, sorted), and the units under them, first to last.
    struct range_run {
        std::size_t end;
        std::size_t first_unit;
        std::size_t last_unit;
    };
    range_run run_at(std::span<const byte_range> ranges, std::size_t begin) const noexcept {
        const std::size_t start = ranges[begin].offset;
        std::size_t stop = start + ranges[begin].bytes;
        std::size_t end = begin + 1;
        for (; end < ranges.size() && ranges[end].offset >= start && ranges[end].offset <= stop; ++end) {
            stop = std::max(stop, ranges[end].offset + ranges[end].bytes);
        }
        const std::size_t first = b_.unit_of(start);
        return {end, first, stop <= b_.unit_offset(first + 1) ? first : b_.unit_of(stop - 1)};
    }
    /// Whether a unit under any of `ranges` is in flight. The caller holds the lock.
    bool any_in_flight(std::span<const byte_range> ranges) const noexcept {
        bool in_flight = false;
        for (std::size_t i = 0; i < ranges.size();) {
            const range_run run = run_at(ranges, i);
            for (std::size_t u = run.first_unit; u <= run.last_unit; ++u) {
                in_flight = in_flight || b_.table.is_in_flight(u);
            }
            i = run.end;
        }
        return in_flight;
    }
    bool all_committed(std::size_t first, std::size_t last) const noexcept {
        for (std::size_t u = first; u <= last; ++u) {
            if (b_.table.state[u] != detail::unit_state::committed) {
                return false;
            }
        }
        return true;
    }
    /// The units under `ranges`, first to last.
    detail::unit_span span_of(std::span<const byte_range> ranges) const noexcept {
        detail::unit_span s{b_.units, 0};
        for (const byte_range& r : ranges) {
            s.first = std::min(s.first, b_.unit_of(r.offset));
            s.last = std::max(s.last, b_.last_unit_of(r.offset, r.bytes));
        }
        return s;
    }

    /// What a caller's commit is for: holds that follow at once (the range's units are taken by
    /// the caller; the last run may reach ahead as the growth rate says, and counts as growth),
    /// or spares committed ahead of holds (exactly the range; all of it spares).
    enum class commit_mode { for_holds, ahead };

    /// Commits the uncommitted units of [first, last] on the caller's thread, or none of them;
    /// returns the backing commits made. A run of them is one extent (one handle) with an extent
    /// growth policy; for holds, the last run reaches past `last` as far as the growth rate says
    /// (extent_sizer) and those units become spares. Units in flight or committed are skipped.
    /// Room made under quota pressure spares `keep` (default: [first, last]). `committed`, when
    /// given, gets the extents committed appended (a caller that commits several ranges rolls
    /// them all back on a later failure).
    std::size_t commit_range(std::size_t first, std::size_t last, commit_mode mode,
                             std::vector<std::size_t>* committed = nullptr, detail::unit_span keep = {}) {
        if (keep.first > keep.last) {
            keep = {first, last};
        }
        const std::size_t most = b_.sizer.max_units();
        const auto sizer_before = b_.sizer;
        std::vector<std::size_t> done;  // first units of the extents this call committed
        try {
            for (std::size_t u = first; u <= last;) {
                if (b_.table.state[u] != detail::unit_state::uncommitted) {
                    ++u;
                    continue;
                }
                std::size_t needed = 1;
                while (needed < most && u + needed <= last && b_.table.state[u + needed] == detail::unit_state::uncommitted) {
                    ++needed;
                }
                std::size_t n = needed;
                const auto now = clock::now();
                const bool for_holds = mode == commit_mode::for_holds;
                if (for_holds && most > 1 && u + needed > last) {  // the end of the range: grow ahead as fast as demand comes
                    const std::size_t want = b_.sizer.size_at(now);
                    while (n < want && u + n < b_.units && b_.table.state[u + n] == detail::unit_state::uncommitted) {
                        ++n;
                    }
                }
                n = b_.commit(u, n, needed, {.make_room = true, .keep = keep});
                if (for_holds) {
                    b_.sizer.committed(now);  // growth one hold at a time: what the sizer follows
                }
                done.push_back(u);
                for (std::size_t a = for_holds ? std::max(u, last + 1) : u; a < u + n; ++a) {
                    b_.make_idle(a);  // committed ahead: spares
                }
                u += n;
            }
            if (committed != nullptr) {
                committed->insert(committed->end(), done.begin(), done.end());
            }
        } catch (...) {
            b_.roll_back(done);
            b_.sizer = sizer_before;  // after the rollback's decommits, which are no churn
            throw;
        }
        return done.size();
    }

    /// A prepaid_charge ends: what its commits did not draw goes back to the quota.
    void end_prepaid() noexcept {
        std::lock_guard lock(b_.mutex);
        b_.uncharge(std::exchange(b_.prepaid, 0));
        b_.prepaid_owner = std::thread::id{};
    }

    /// How long another model's reclaim waits for this pool's lock before it gives up on it. A
    /// busy pool is usually busy for microseconds (bookkeeping, one driver call); waiting a
    /// bounded time keeps two pools that reclaim from each other free of deadlock.
    static constexpr std::chrono::milliseconds reclaim_wait{20};

    /// Another model of the budget was refused: give every spare back. A busy pool is waited for
    /// up to reclaim_wait, then skipped (the other model's commit then fails with over_quota);
    /// for another process's request (detail::reclaim_without_waiting) it is skipped at once.
    std::size_t give_back_for_others() noexcept {
        std::unique_lock lock(b_.mutex, std::defer_lock);
        const auto give_up =
            clock::now() + (detail::reclaim_without_waiting ? std::chrono::milliseconds(0) : reclaim_wait);
        while (!lock.try_lock()) {
            if (clock::now() > give_up) {
                return 0;
            }
            std::this_thread::sleep_for(std::chrono::microseconds(20));
        }
        const std::size_t freed = b_.give_back_spares({});
        b_.stats.reclaims += freed > 0 ? 1 : 0;
        return freed;
    }

    books b_;
    const std::uint64_t id_ = next_pool_id();  // names this pool's fences
};

} // namespace vmmpp
