// vmmpp/pool.hpp: elastic_pool<Config>: one reserved span whose physical memory follows what is
// held in it. Callers hold byte ranges (a KV block, say); the pool commits the pages under them
// through the backing, charged to the quota, in units the growth policy chooses, and gives
// pages back when nothing holds them any more.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/fence_queue.hpp"
#include "vmmpp/detail/release_agent.hpp"
#include "vmmpp/detail/range_counts.hpp"
#include "vmmpp/detail/unit_table.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/growth/adaptive_extents.hpp"
#include "vmmpp/growth/concept.hpp"
#include "vmmpp/growth/mapped_ahead.hpp"
#include "vmmpp/growth/mapper.hpp"
#include "vmmpp/quota/concept.hpp"

namespace vmmpp {

namespace detail {
/// Checks that cost a map lookup per call run in builds without NDEBUG (tests, debugging).
#ifdef NDEBUG
inline constexpr bool debug_checks = false;
#else
inline constexpr bool debug_checks = true;
#endif
} // namespace detail

/// Bytes [offset, offset + bytes) of a pool's span.
struct byte_range {
    std::size_t offset = 0;
    std::size_t bytes = 0;
};

/// A committed extent of a pool (elastic_pool::committed_extents): where it lies in the span,
/// and `commit`, the number of the commit that made it (it grows with every commit, so an extent
/// given back and committed again at the same offset is told apart from the old one).
struct committed_extent {
    std::size_t offset = 0;
    std::size_t bytes = 0;
    std::uint64_t commit = 0;
    friend bool operator==(const committed_extent&, const committed_extent&) = default;
};

/// A fence recorded by elastic_pool::record_fence: memory released "after" it goes back to the
/// device only once the GPU work queued before it on its stream has completed. It names its pool
/// (a fence of another pool is refused), its stream's lane in that pool, and its number on that
/// lane. The default, value 0, is no fence.
struct pool_fence {
    std::uint64_t pool = 0;
    std::uint32_t lane = 0;
    std::uint64_t value = 0;
    friend bool operator==(const pool_fence&, const pool_fence&) = default;
};

/// What a pool without a background mapper holds in its place: nothing.
struct no_mapper {
    template <class... Args>
    explicit no_mapper(Args&&...) noexcept {}
};

/// A mutex that does nothing, for pools only ever used from one thread.
struct null_mutex {
    void lock() noexcept {}
    void unlock() noexcept {}
    bool try_lock() noexcept { return true; }
};

/// A std::mutex that spins for up to a few microseconds before it sleeps. The pool's critical
/// sections are bookkeeping (about a microsecond), and a thread put to sleep on a mutex takes
/// several microseconds to wake: an append that meets the mapper publishing a page should spin,
/// not sleep. Spinning stops after ~10 us, so a caller waiting behind a driver call sleeps.
class adaptive_mutex {
public:
    void lock() {
        if (mutex_.try_lock()) {
            return;
        }
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(10);
        for (unsigned i = 1;; ++i) {
            cpu_relax();
            if (mutex_.try_lock()) {
                return;
            }
            if (i % 64 == 0 && std::chrono::steady_clock::now() > give_up) {
                break;
            }
        }
        mutex_.lock();
    }
    void unlock() { mutex_.unlock(); }
    bool try_lock() { return mutex_.try_lock(); }

    /// A pause for spin-wait loops.
    static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        asm volatile("yield");
#endif
    }

private:
    std::mutex mutex_;
};

/// A pool's compile-time configuration: where bytes come from, how the pool grows and shrinks,
/// who may commit how much, and the mutex that makes it thread safe (`null_mutex` for none;
/// `adaptive_mutex` by default).
template <class Backing, class Growth, class Quota, class Mutex = adaptive_mutex>
struct pool_config {
    static_assert(backing<Backing>, "vmmpp::pool_config: Backing does not model vmmpp::backing");
    static_assert(growth_policy<Growth>, "vmmpp::pool_config: Growth does not model vmmpp::growth_policy");
    static_assert(quota_policy<Quota>, "vmmpp::pool_config: Quota does not model vmmpp::quota_policy");
    static_assert(Backing::is_elastic || !Growth::is_elastic,
                  "vmmpp::pool_config: an elastic growth policy over a fixed backing (device, external) would only "
                  "pretend to give memory back; use vmmpp::preallocated");
    static_assert(!background_growth_policy<Growth> || !std::is_same_v<Mutex, null_mutex>,
                  "vmmpp::pool_config: a background mapper (mapped_ahead) needs a real Mutex, not null_mutex");

    using backing_type = Backing;
    using growth_type = Growth;
    using quota_type = Quota;
    using mutex_type = Mutex;
};

/// Statistics of a pool (a consistent snapshot).
struct pool_stats {
    std::size_t reserved = 0;         ///< bytes of address space (the capacity)
    std::size_t committed = 0;        ///< bytes backed by physical memory now
    std::size_t peak_committed = 0;   ///< most bytes ever committed at once
    std::size_t held_pages = 0;       ///< pages that something holds
    std::size_t idle_units = 0;       ///< committed units that nothing holds (spares)
    std::size_t cached_bytes = 0;     ///< decommitted physical handles the backing keeps for reuse
    std::size_t charged = 0;          ///< bytes charged to the quota: committed + cached_bytes (+ a unit the mapper is committing)
    std::uint64_t commits = 0;        ///< backing commit calls
    std::uint64_t decommits = 0;      ///< backing decommit calls
    std::uint64_t sync_commits = 0;   ///< commits made on a caller's thread (the critical path)
    std::uint64_t mapper_commits = 0;     ///< commits made ahead of demand by the background mapper
    std::uint64_t mapper_decommits = 0;   ///< lazy decommits made by the background mapper
    std::uint64_t mapper_failures = 0;    ///< mapper commits refused (quota, memory) or failed
    std::uint64_t waits = 0;          ///< times a caller waited for the mapper to finish a unit it needed
    std::uint64_t reclaims = 0;       ///< times another model's pressure made this pool give spares back
    std::size_t awaiting_gpu_units = 0;   ///< spares whose release waits for GPU work still queued (as of the pool's last look)
    std::size_t pending_fences = 0;       ///< fences recorded and not yet seen complete
    std::uint64_t fences = 0;             ///< fences recorded (record_fence, release with a stream)
    std::uint64_t agent_wakeups = 0;      ///< host functions queued so that the release agent gives memory back when the GPU is done
    std::size_t agent_released = 0;       ///< bytes the release agent gave back (the GPU finished after the release; no call came)
    std::uint64_t decommit_failures = 0;  ///< decommits the backing refused (the unit stayed committed or was retired)
    std::size_t retired_units = 0;        ///< units taken out of service after a decommit that failed half done
    std::size_t retired_bytes = 0;        ///< their bytes (still charged: they may still hold memory)
    std::chrono::nanoseconds driver_time{0};  ///< time spent inside the backing's commit/decommit
};

/// An elastic pool over one backing.
///
/// Thread safety: every member function may be called concurrently from any threads; they
/// serialise on `Config::mutex_type` (the driver serialises VMM calls anyway).
/// `base()`, `capacity()` and `page_bytes()` never change and take no lock.
///
/// Background mapping: with a growth policy that models background_growth_policy (mapped_ahead),
/// the pool runs a mapper thread that commits spare units ahead of demand and gives idle ones
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

    /// Builds the backing with `capacity` bytes (a multiple of its granularity). A pool whose
    /// growth policy is not elastic commits the whole span here, charged to the quota.
    explicit elastic_pool(std::size_t capacity, typename backing_type::options backing_options = {},
                          growth_type growth = {}, quota_type quota = {})
        : backing_(capacity, std::move(backing_options)),
          growth_(std::move(growth)),
          quota_(std::move(quota)),
          page_bytes_(backing_.granularity()),
          pages_(backing_.capacity() / page_bytes_),
          unit_pages_(std::min(growth_.unit_pages(), pages_)),
          units_((pages_ + unit_pages_ - 1) / unit_pages_),
          page_holds_(pages_, 0),
          table_(units_),
          fences_(device_of(backing_)),
          mapper_(growth_, units_),
          sizer_(max_extent_units_of(growth_), unit_pages_ * page_bytes_, extent_fast_growth_rate_of(growth_)) {
        stats_.reserved = backing_.capacity();
        if constexpr (!growth_type::is_elastic) {
            (void)commit_range(0, units_ - 1, commit_mode::for_holds);
            for (std::size_t u = 0; u < units_; ++u) {
                make_idle(u);
            }
        }
        if constexpr (can_reclaim) {
            quota_.set_reclaimer([this] { return give_back_for_others(); });
        }
        if constexpr (has_mapper) {
            mapper_.thread = std::thread([this] { mapper_loop(); });  // last: everything it reads exists
        }
    }
    elastic_pool(const elastic_pool&) = delete;
    elastic_pool& operator=(const elastic_pool&) = delete;

    /// Stops the mapper (it finishes the unit in flight), then gives every committed unit and
    /// kept handle back, to the backing and the quota.
    ~elastic_pool() {
        if constexpr (uses_agent) {
            if (agent_client_ != 0) {
                detail::release_agent::instance().remove(agent_client_);  // waits for a call in progress
            }
        }
        if constexpr (can_reclaim) {
            quota_.clear_reclaimer();
        }
        if constexpr (has_mapper) {
            mapper_.stop([this] { return std::unique_lock(mutex_); });
        }
        try {
            fences_.wait_all();  // never unmap under queued work, even at the end
        } catch (...) {
            // the work failed (a lost context): nothing on the GPU can use the memory any more
        }
        for (std::size_t u = 0; u < units_; ++u) {
            const bool backed =
                table_.state[u] == detail::unit_state::committed || table_.state[u] == detail::unit_state::retired;
            if (backed && table_.extent_first[u] == u) {
                try {
                    backing_.decommit(unit_offset(u), extent_bytes(u, table_.extent_units[u]));
                } catch (...) {
                    // The backing frees everything in its own destructor; only the quota matters here.
                }
            }
        }
        if constexpr (keeps_handles) {
            (void)backing_.release_cached();
        }
        quota_.release(charged_.load());
    }

    /// Holds [offset, offset+bytes): commits every page under it that is not committed yet.
    /// The range need not be page aligned; pages are held by count, so ranges may share pages.
    /// Throws: invalid_argument (range outside the pool), retired_memory, over_quota,
    /// out_of_memory, cuda_error.
    /// Guarantee: strong; every unit this call committed is decommitted again and nothing is
    /// held. Except: spares the pool gave back to make room under quota pressure stay given back.
    /// Waits: for a unit the mapper has in flight; for the driver when it commits.
    void ensure_committed(std::size_t offset, std::size_t bytes) {
        check_range("ensure_committed", offset, bytes);
        std::unique_lock lock(mutex_);
        const std::size_t first_page = offset / page_bytes_;
        const std::size_t last_page = (offset + bytes - 1) / page_bytes_;
        const std::size_t first_unit = first_page / unit_pages_;
        const std::size_t last_unit = last_page / unit_pages_;
        for (std::size_t u = first_unit; u <= last_unit; ++u) {
            if (table_.state[u] == detail::unit_state::retired) {
                throw retired_memory(unit_offset(u), unit_bytes(u));
            }
        }
        range_hold_guard range_hold(*this, offset, bytes);  // debug builds: counts holds per range
        for (;;) {
            bool all_committed = true;
            bool in_flight = false;
            for (std::size_t u = first_unit; u <= last_unit; ++u) {
                all_committed = all_committed && table_.state[u] == detail::unit_state::committed;
                in_flight = in_flight || table_.is_in_flight(u);
            }
            if (all_committed) {
                break;  // the common case (a block on a committed page) allocates nothing
            }
            if (in_flight) {
                ++stats_.waits;  // the mapper is mapping or unmapping one of them: never map twice
                if constexpr (has_mapper) {
                    mapper_.settled.wait(lock);
                }
                continue;
            }
            stats_.sync_commits += commit_range(first_unit, last_unit, commit_mode::for_holds);
            if constexpr (has_mapper) {
                mapper_.plan.on_missed();  // the spares were elsewhere: map ahead of this demand
                if (mapper_.waiting) {
                    mapper_.wake.notify_one();
                }
            }
            break;
        }
        range_hold.keep();
        for (std::size_t p = first_page; p <= last_page; ++p) {
            if (page_holds_[p]++ == 0) {
                ++held_pages_;
                const std::size_t u = p / unit_pages_;
                if (table_.held_pages[u]++ == 0) {
                    forget_idle(u);
                    note_taken(u);
                }
            }
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
        check_range("release", offset, bytes);
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
        for (const byte_range& r : ranges) {
            check_range("release", r.offset, r.bytes);
        }
        std::lock_guard lock(mutex_);
        for (const pool_fence& f : after) {
            check_fence("release", f);
        }
        for (const byte_range& r : ranges) {
            release_locked(r.offset, r.bytes, after);
        }
        if constexpr (has_mapper) {
            if (table_.idle.size() > mapper_.plan.high_watermark() && mapper_.waiting && !mapper_.has_deadline) {
                mapper_.wake.notify_one();  // the mapper sleeps without a timer: let it schedule the lazy release
            }
        } else {
            const std::size_t keep = growth_.idle_units_to_keep(table_.committed, table_.idle.size());
            (void)shrink(keep);
            if (table_.idle.size() > keep && idle_memory_awaits_gpu()) {
                call_agent_when_done(after);
            }
        }
    }

    /// Records a fence after the work queued on `stream` so far, for release(offset, bytes,
    /// fence): e.g. one fence for every block a step frees. Host memory needs none (returns the
    /// empty fence). The caller's thread does not wait. Throws: cuda_error (nothing recorded).
    [[nodiscard]] pool_fence record_fence(cudaStream_t stream) {
        std::lock_guard lock(mutex_);
        const detail::fence f = fences_.record(stream);
        stats_.fences += f.seq != 0 ? 1 : 0;
        return f.seq == 0 ? pool_fence{} : pool_fence{id_, f.lane, f.seq};
    }

    /// Whether the GPU work before every fence of `fences` has completed (asks the driver, never
    /// waits). Throws: invalid_argument for a fence this pool did not record; cuda_error.
    [[nodiscard]] bool is_complete(std::span<const pool_fence> fences) {
        std::lock_guard lock(mutex_);
        bool polled = false;
        for (const pool_fence& f : fences) {
            check_fence("is_complete", f);
            if (!fences_.is_complete(detail::fence{f.lane, f.value}) && !std::exchange(polled, true)) {
                fences_.poll();
            }
            if (!fences_.is_complete(detail::fence{f.lane, f.value})) {
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
        std::lock_guard lock(mutex_);
        for (const pool_fence& f : fences) {
            check_fence("make_wait", f);
        }
        fences_.poll();
        std::erase_if(fences, [&](const pool_fence& f) { return fences_.is_complete(detail::fence{f.lane, f.value}); });
        for (const pool_fence& f : fences) {
            fences_.make_wait(stream, detail::fence{f.lane, f.value});
        }
    }

    /// Gives back, as the growth policy says, units whose release waited for GPU work that has
    /// completed since; never waits. Returns the bytes given back. Every release, trim and
    /// budget reclaim does this too; call it when the engine frees nothing for a while.
    /// Throws: cuda_error when the driver fails (a fenced work's failure, a decommit).
    std::size_t collect() {
        std::lock_guard lock(mutex_);
        poll_fences();
        if constexpr (has_mapper) {
            return 0;  // the mapper gives spares back on its own thread, after release_delay
        } else {
            return shrink(growth_.idle_units_to_keep(table_.committed, table_.idle.size()));
        }
    }

    /// Waits until the GPU work behind every fence recorded so far has completed (blocking the
    /// caller, as cudaFree would), then collects. Returns the bytes given back.
    /// Throws: cuda_error, as collect.
    std::size_t synchronize() {
        {
            std::lock_guard lock(mutex_);
            fences_.wait_all();
        }
        return collect();
    }

    /// Gives back every committed unit nothing holds, spares included, and every kept handle
    /// (e.g. when another model needs the budget). Units the mapper has in flight finish on its
    /// thread; units whose GPU work is still queued stay. Returns the bytes this call gave back
    /// to the quota. A preallocated pool gives nothing back. Throws: cuda_error, as collect.
    std::size_t trim() {
        std::lock_guard lock(mutex_);
        if constexpr (!growth_type::is_elastic) {
            return 0;
        } else {
            stop_refilling();
            poll_fences();
            const std::size_t freed = shrink(0);
            return freed + drop_kept_handles();
        }
    }

    /// A hint that [offset, offset+bytes) will be needed soon: a background mapper maps the units
    /// there (and then the ones after them) into its spares. Without a mapper it does nothing.
    /// kv_cache gives this hint for the first block of each of its regions.
    /// Throws: invalid_argument for a range outside the pool. Thread safety: any thread.
    void will_need(std::size_t offset, std::size_t bytes) {
        check_range("will_need", offset, bytes);
        if constexpr (has_mapper) {
            std::lock_guard lock(mutex_);
            mapper_.plan.will_need(offset / page_bytes_ / unit_pages_, (offset + bytes - 1) / page_bytes_ / unit_pages_);
            mapper_.wake.notify_one();
        }
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
        for (const byte_range& r : ranges) {
            check_range("prepay", r.offset, r.bytes);
        }
        std::lock_guard lock(mutex_);
        if (prepaid_owner_ != std::thread::id{}) {
            return {};
        }
        std::vector<std::size_t> units;  // uncommitted units under the ranges, each once
        std::size_t keep_first = units_, keep_last = 0;
        for (const byte_range& r : ranges) {
            const std::size_t first = r.offset / page_bytes_ / unit_pages_;
            const std::size_t last = (r.offset + r.bytes - 1) / page_bytes_ / unit_pages_;
            keep_first = std::min(keep_first, first);
            keep_last = std::max(keep_last, last);
            for (std::size_t u = first; u <= last; ++u) {
                if (table_.state[u] == detail::unit_state::retired) {
                    throw retired_memory(unit_offset(u), unit_bytes(u));
                }
                if (table_.state[u] == detail::unit_state::uncommitted && !table_.is_in_flight(u)) {
                    units.push_back(u);
                }
            }
        }
        std::sort(units.begin(), units.end());
        units.erase(std::unique(units.begin(), units.end()), units.end());
        std::size_t bytes = 0;
        for (std::size_t u : units) {
            bytes += unit_bytes(u);
        }
        if (bytes == 0) {
            return {};
        }
        charge_making_room(bytes, keep_first, keep_last);
        prepaid_ = bytes;
        prepaid_owner_ = std::this_thread::get_id();
        return {this, bytes};
    }

    /// Commits every uncommitted unit under `ranges` now, as spares, in as few extents as the
    /// growth policy allows (with adaptive_extents: runs of up to max_extent_pages, one handle
    /// each), so the holds that follow find them committed. What kv_cache does for the blocks
    /// of one append: a prompt's blocks then share extents, which empty when its sequence ends.
    /// Units in flight are left to the mapper.
    /// Throws: as ensure_committed. Guarantee: strong (nothing stays committed on failure).
    void commit_ahead(std::span<const byte_range> ranges) {
        for (const byte_range& r : ranges) {
            check_range("commit_ahead", r.offset, r.bytes);
        }
        std::lock_guard lock(mutex_);
        for (const byte_range& r : ranges) {
            for (std::size_t u = r.offset / page_bytes_ / unit_pages_; u <= (r.offset + r.bytes - 1) / page_bytes_ / unit_pages_; ++u) {
                if (table_.state[u] == detail::unit_state::retired) {
                    throw retired_memory(unit_offset(u), unit_bytes(u));
                }
            }
        }
        // Room made under quota pressure never takes what this call committed: keep all of it.
        std::size_t keep_first = units_, keep_last = 0;
        for (const byte_range& r : ranges) {
            keep_first = std::min(keep_first, r.offset / page_bytes_ / unit_pages_);
            keep_last = std::max(keep_last, (r.offset + r.bytes - 1) / page_bytes_ / unit_pages_);
        }
        std::vector<std::size_t> done;  // extents committed by earlier ranges, for the rollback
        try {
            for (const byte_range& r : ranges) {
                stats_.sync_commits += commit_range(r.offset / page_bytes_ / unit_pages_,
                                                    (r.offset + r.bytes - 1) / page_bytes_ / unit_pages_,
                                                    commit_mode::ahead, &done, keep_first, keep_last);
            }
        } catch (...) {
            roll_back(done);
            throw;
        }
    }

    /// Whether a commit may cover several units (the growth policy models extent_growth_policy).
    static constexpr bool commits_extents = extent_growth_policy<growth_type>;

    [[nodiscard]] std::byte* base() const noexcept { return backing_.base(); }
    [[nodiscard]] std::size_t capacity() const noexcept { return stats_.reserved; }
    /// The backing's granularity: the unit pages are held and counted in.
    [[nodiscard]] std::size_t page_bytes() const noexcept { return page_bytes_; }
    /// Bytes one growth step commits.
    [[nodiscard]] std::size_t unit_bytes() const noexcept { return unit_pages_ * page_bytes_; }

    /// The CUDA device of the memory, or -1 for host memory.
    [[nodiscard]] int device() const noexcept { return device_of(backing_); }
    /// Number of growth units the span is cut into, and whether unit `u` is committed now:
    /// the committed regions an engine registers with an RDMA library.
    [[nodiscard]] std::size_t unit_count() const noexcept { return units_; }
    [[nodiscard]] bool is_unit_committed(std::size_t u) const {
        std::lock_guard lock(mutex_);
        return u < units_ && table_.state[u] == detail::unit_state::committed;
    }
    /// Byte offset and length of unit `u` within the span.
    [[nodiscard]] std::size_t unit_offset_of(std::size_t u) const noexcept { return unit_offset(u); }
    [[nodiscard]] std::size_t unit_bytes_of(std::size_t u) const noexcept { return unit_bytes(u); }

    [[nodiscard]] std::size_t committed_bytes() const {
        std::lock_guard lock(mutex_);
        return stats_.committed;
    }
    /// The committed extents, lowest offset first: each is what one backing commit mapped (one
    /// physical handle on the vmm backing), the regions a transfer engine registers, since NIXL
    /// and UCX export and import a handle whole (vmmpp/interop/nixl.hpp).
    [[nodiscard]] std::vector<committed_extent> committed_extents() const {
        std::lock_guard lock(mutex_);
        std::vector<committed_extent> out;
        for (std::size_t u = 0; u < units_;) {
            if (table_.state[u] != detail::unit_state::committed || table_.extent_first[u] != u) {
                ++u;  // uncommitted, retired or on its way (the mapper's): not memory to hand out
                continue;
            }
            out.push_back({unit_offset(u), extent_bytes_of(u), table_.extent_commit[u]});
            u += table_.extent_units[u];
        }
        return out;
    }
    /// Whether every page under [offset, offset+bytes) is committed.
    [[nodiscard]] bool is_committed(std::size_t offset, std::size_t bytes) const {
        check_range("is_committed", offset, bytes);
        std::lock_guard lock(mutex_);
        for (std::size_t p = offset / page_bytes_; p <= (offset + bytes - 1) / page_bytes_; ++p) {
            if (table_.state[p / unit_pages_] != detail::unit_state::committed) {
                return false;
            }
        }
        return true;
    }
    [[nodiscard]] pool_stats stats() const {
        std::lock_guard lock(mutex_);
        pool_stats s = stats_;
        s.held_pages = held_pages_;
        s.idle_units = table_.idle.size();
        s.charged = charged_.load();
        s.cached_bytes = kept_snapshot_.load();
        s.driver_time = std::chrono::nanoseconds(driver_ns_.load());
        s.pending_fences = fences_.pending();
        if (fences_.pending() > 0) {  // otherwise every fence has completed
            table_.idle.for_each([&](std::size_t u) { s.awaiting_gpu_units += gpu_done_with(u) ? 0 : 1; });
        }
        return s;
    }

    /// The quota this pool charges (e.g. to read a shared_budget's statistics).
    [[nodiscard]] const quota_type& quota() const noexcept { return quota_; }
    /// The backing, for what only it knows (a vmm backing's handle count, say). With a
    /// background mapper the backing changes under the caller: use with_backing.
    [[nodiscard]] const backing_type& backing() const noexcept { return backing_; }
    /// Calls f(backing) with the pool and its backing locked, so no commit runs meanwhile
    /// (e.g. to export the handles of a pool that maps in the background).
    template <class F>
    decltype(auto) with_backing(F&& f) const {
        std::lock_guard lock(mutex_);
        std::lock_guard backing_lock(backing_mutex_);
        return std::forward<F>(f)(backing_);
    }

private:
    enum class unit_state : std::uint8_t { uncommitted, committed, committing, decommitting, retired };
    using clock = std::chrono::steady_clock;
    /// Backing calls made outside the pool's lock (by the mapper) serialise on this one.
    using backing_mutex_type = std::conditional_t<has_mapper, std::mutex, null_mutex>;
    /// Kept handles occupy the device: charged while kept, dropped under pressure.
    static constexpr bool keeps_handles = handle_keeping_backing<backing_type>;
    /// Pools that other models' pressure can reclaim spares from (a single-threaded pool cannot
    /// be entered from another thread).
    static std::uint64_t next_pool_id() noexcept {
        static std::atomic<std::uint64_t> last{0};
        return ++last;
    }
    /// Pools that the release agent serves: elastic, thread safe (the agent calls from its own
    /// thread), and without a mapper thread of their own (which gives spares back itself).
    static constexpr bool uses_agent =
        growth_type::is_elastic && !has_mapper && !std::is_same_v<mutex_type, null_mutex>;
    static constexpr bool can_reclaim =
        growth_type::is_elastic && !std::is_same_v<mutex_type, null_mutex> && reclaiming_quota<quota_type>;

    void check_range(const char* operation, std::size_t offset, std::size_t bytes) const {
        if (bytes == 0 || offset >= stats_.reserved || bytes > stats_.reserved - offset) {
            throw invalid_argument(std::string(operation) + " of [" + std::to_string(offset) + ", +" +
                                   std::to_string(bytes) + "): empty or beyond the pool's capacity " +
                                   std::to_string(stats_.reserved) + " bytes");
        }
    }

    /// Debug builds count holds per byte, so that releasing a range twice is caught even when
    /// another range still holds the page (page counts alone cannot tell). Undone unless kept.
    /// The caller holds mutex_.
    class range_hold_guard {
    public:
        range_hold_guard(elastic_pool& pool, std::size_t offset, std::size_t bytes)
            : pool_(pool), offset_(offset), bytes_(bytes) {
            if constexpr (detail::debug_checks) {
                pool_.range_holds_.add(offset, bytes);  // may throw: nothing changed yet
            }
        }
        range_hold_guard(const range_hold_guard&) = delete;
        range_hold_guard& operator=(const range_hold_guard&) = delete;
        ~range_hold_guard() {
            if constexpr (detail::debug_checks) {
                if (!kept_) {
                    pool_.range_holds_.remove(offset_, bytes_);
                }
            }
        }
        void keep() noexcept { kept_ = true; }

    private:
        elastic_pool& pool_;
        std::size_t offset_;
        std::size_t bytes_;
        bool kept_ = false;
    };
    /// Debug builds: one hold fewer on every byte of [offset, offset+bytes), or invalid_argument
    /// (and no change) when some byte of it is not held.
    void forget_range_hold(std::size_t offset, std::size_t bytes) {
        if constexpr (detail::debug_checks) {
            if (!range_holds_.covers(offset, bytes)) {
                throw invalid_argument("release of [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                       "): part of that range is not held (released twice?)");
            }
            range_holds_.remove(offset, bytes);
        }
    }

    /// Memory of this release waits for `after` and no later call may come: the release agent
    /// gives it back when the GPU gets there, woken by a host function behind each fence not
    /// complete (one per stream at a time: if one is outstanding, the agent polls for the rest
    /// after it fired). A failure to queue one leaves the memory to the next call.
    void call_agent_when_done(std::span<const pool_fence> after) noexcept {
        if constexpr (uses_agent) {
            for (const pool_fence& f : after) {
                const detail::fence fence{f.lane, f.value};
                if (!fences_.needs_host_function(fence)) {
                    continue;
                }
                try {
                    auto& agent = detail::release_agent::instance();
                    if (agent_client_ == 0) {
                        agent_client_ = agent.add([this](std::uint32_t lane) { return collect_for_agent(lane); });
                    }
                    fences_.on_stream_of(fence.lane,
                                         [&](CUstream stream) { agent.call_when_reached(stream, agent_client_, fence.lane); });
                    ++stats_.agent_wakeups;
                } catch (...) {
                    fences_.host_function_done(fence.lane);  // none queued: the memory goes back on the next call
                }
            }
        }
    }
    /// The release agent's call, on its thread: the host function behind lane `lane` has run
    /// (or, with release_agent::no_tag, a poll). Gives back what may go; returns whether idle
    /// memory still waits for the GPU (the agent then polls again shortly).
    bool collect_for_agent(std::uint32_t lane) noexcept {
        if constexpr (uses_agent) {
            try {
                std::lock_guard lock(mutex_);
                if (lane != detail::release_agent::no_tag) {
                    fences_.host_function_done(lane);
                }
                const std::size_t keep = growth_.idle_units_to_keep(table_.committed, table_.idle.size());
                stats_.agent_released += shrink(keep);
                return table_.idle.size() > keep && idle_memory_awaits_gpu();
            } catch (...) {
                return false;  // a lost context or a failed decommit: counted in stats(); the next call tries again
            }
        }
        return false;
    }

    /// invalid_argument unless `f` is no fence or one this pool recorded. The caller holds mutex_.
    void check_fence(const char* operation, const pool_fence& f) const {
        if (f.value != 0 && (f.pool != id_ || !fences_.recorded(detail::fence{f.lane, f.value}))) {
            throw invalid_argument(std::string(operation) + " with fence " + std::to_string(f.value) + " of lane " +
                                   std::to_string(f.lane) + (f.pool != id_ ? " recorded by another pool (pool " +
                                   std::to_string(f.pool) + ", this is pool " + std::to_string(id_) + ")"
                                                           : ": this pool never recorded it"));
        }
    }

    /// One range's release, without giving anything back yet: the caller holds mutex_.
    void release_locked(std::size_t offset, std::size_t bytes, std::span<const pool_fence> after) {
        const std::size_t first_page = offset / page_bytes_;
        const std::size_t last_page = (offset + bytes - 1) / page_bytes_;
        for (std::size_t p = first_page; p <= last_page; ++p) {
            if (page_holds_[p] == 0) {
                throw invalid_argument("release of [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                       "): the page at offset " + std::to_string(p * page_bytes_) +
                                       " is not held (released twice?)");
            }
        }
        // A fence more than needed only delays a give-back: added first, as they may allocate.
        for (std::size_t u = first_page / unit_pages_; u <= last_page / unit_pages_; ++u) {
            for (const pool_fence& f : after) {
                table_.fences[u].add(detail::fence{f.lane, f.value});
            }
        }
        forget_range_hold(offset, bytes);
        for (std::size_t p = first_page; p <= last_page; ++p) {
            const std::size_t u = p / unit_pages_;
            if (--page_holds_[p] == 0) {
                --held_pages_;
                if (--table_.held_pages[u] == 0) {
                    make_idle(u);
                }
            }
        }
    }

    [[nodiscard]] std::size_t unit_offset(std::size_t u) const noexcept { return u * unit_pages_ * page_bytes_; }
    [[nodiscard]] std::size_t unit_bytes(std::size_t u) const noexcept { return extent_bytes(u, 1); }
    /// Bytes of units [first, first + n).
    [[nodiscard]] std::size_t extent_bytes(std::size_t first, std::size_t n) const noexcept {
        return (std::min(pages_, (first + n) * unit_pages_) - first * unit_pages_) * page_bytes_;
    }
    [[nodiscard]] std::size_t extent_bytes_of(std::size_t first) const noexcept {
        return extent_bytes(first, table_.extent_units[first]);
    }
    static std::size_t max_extent_units_of(const growth_type& growth) noexcept {
        if constexpr (extent_growth_policy<growth_type>) {
            return growth.max_extent_units();
        } else {
            return 1;
        }
    }
    static std::uint64_t extent_fast_growth_rate_of(const growth_type& growth) noexcept {
        if constexpr (extent_growth_policy<growth_type>) {
            return growth.extent_fast_growth_rate();
        } else {
            return 0;
        }
    }
    [[nodiscard]] std::size_t kept_bytes() const noexcept {
        if constexpr (keeps_handles) {
            return backing_.cached_bytes();
        } else {
            return 0;
        }
    }

    // --- backing calls: the caller holds backing_mutex_ (and may or may not hold mutex_) ---

    template <class F>
    void timed(F&& f) {
        const auto start = clock::now();
        struct add_time {
            std::atomic<std::int64_t>& total;
            clock::time_point start;
            ~add_time() { total += (clock::now() - start).count(); }
        } add{driver_ns_, start};
        std::forward<F>(f)();
    }
    /// Commits units [first, first + n) as one extent, already charged to the quota; a reused
    /// kept handle was charged while kept, so its second charge goes back. Strong guarantee.
    void backing_commit(std::size_t first, std::size_t n) {
        const std::size_t kept_before = kept_bytes();
        // Kept handles that left the backing's cache, whether the commit mapped them or failed
        // and released them, are no longer charged as kept: settle that on both paths.
        struct settle_kept {
            elastic_pool& pool;
            std::size_t before;
            ~settle_kept() {
                const std::size_t after = pool.kept_bytes();
                pool.uncharge(before > after ? before - after : 0);
                pool.kept_snapshot_ = after;
            }
        } settle{*this, kept_before};
        timed([&] { backing_.commit(unit_offset(first), extent_bytes(first, n)); });
    }
    /// Decommits the extent that starts at unit `first` and gives the quota back what left the
    /// device (a handle the backing keeps for reuse stays charged); returns the bytes uncharged.
    std::size_t backing_decommit(std::size_t first) {
        const std::size_t kept_before = kept_bytes();
        const std::size_t bytes = extent_bytes_of(first);
        timed([&] { backing_.decommit(unit_offset(first), bytes); });
        const std::size_t freed = bytes - (kept_bytes() - kept_before);
        uncharge(freed);
        kept_snapshot_ = kept_bytes();
        return freed;
    }
    /// Releases the backing's kept handles; returns the bytes uncharged.
    std::size_t drop_kept_handles() noexcept {
        if constexpr (keeps_handles) {
            std::lock_guard backing_lock(backing_mutex_);
            const std::size_t freed = backing_.release_cached();
            uncharge(freed);
            kept_snapshot_ = 0;
            return freed;
        } else {
            return 0;
        }
    }

    void charge(std::size_t bytes) {
        quota_.acquire(bytes);
        charged_ += bytes;
    }
    void uncharge(std::size_t bytes) noexcept {
        if (bytes > 0) {
            charged_ -= bytes;
            quota_.release(bytes);
        }
    }

    // --- bookkeeping: the caller holds mutex_ ---

    /// Committed unit u, held by nothing now, becomes a spare. Throws bad_alloc (nothing changed).
    void make_idle(std::size_t u) {
        const bool inserted = table_.idle.insert(u).second;
        try {
            table_.note_idle(u);
        } catch (...) {
            if (inserted) {
                table_.idle.erase(u);
            }
            throw;
        }
        if constexpr (has_mapper) {
            mapper_.plan.on_idle(table_, u, clock::now());
        }
    }
    /// Unit u is no spare any more (held again, or going back with its extent).
    void forget_idle(std::size_t u) noexcept {
        if (table_.idle.erase(u) != 0) {
            table_.note_not_idle(u);
        }
    }
    /// Every unit of the extent that starts at `first` leaves the spares (it is going back).
    void forget_extent_idle(std::size_t first) noexcept {
        for (std::size_t u = first; u < first + table_.extent_units[first]; ++u) {
            forget_idle(u);
        }
    }
    void set_extent_state(std::size_t first, detail::unit_state state) noexcept {
        for (std::size_t u = first; u < first + table_.extent_units[first]; ++u) {
            table_.state[u] = state;
        }
    }
    void note_committed(std::size_t first, std::size_t n, bool by_mapper) {
        table_.set_extent(first, n);
        set_extent_state(first, detail::unit_state::committed);
        table_.committed += n;
        ++stats_.commits;
        table_.extent_commit[first] = stats_.commits;
        stats_.mapper_commits += by_mapper ? 1 : 0;
        stats_.committed += extent_bytes(first, n);
        stats_.peak_committed = std::max(stats_.peak_committed, stats_.committed);
    }
    void note_decommitted(std::size_t first) {
        sizer_.gave_back();
        for (std::size_t u = first; u < first + table_.extent_units[first]; ++u) {
            table_.fences[u].clear();  // its memory is gone: nothing to wait for any more
        }
        set_extent_state(first, detail::unit_state::uncommitted);
        table_.committed -= table_.extent_units[first];
        ++stats_.decommits;
        stats_.committed -= extent_bytes_of(first);
    }

    /// A caller took unit u: the mapper learns where demand goes. A polling mapper finds a refill
    /// by itself; waking one costs this (critical) path a system call, so only a mapper asleep
    /// for good is woken.
    void note_taken(std::size_t u) {
        if constexpr (has_mapper) {
            if (mapper_.plan.on_taken(table_, u, clock::now()) && mapper_.waiting) {
                mapper_.wake.notify_one();
            }
        }
    }
    void stop_refilling() noexcept {
        if constexpr (has_mapper) {
            mapper_.plan.stop_refilling();
        }
    }

    /// What a caller's commit is for: holds that follow at once (the range's units are taken by
    /// the caller; the last run may reach ahead as the growth rate says, and counts as growth),
    /// or spares committed ahead of holds (exactly the range; all of it spares).
    enum class commit_mode { for_holds, ahead };

    /// Commits the uncommitted units of [first_unit, last_unit] on the caller's thread, or none
    /// of them; returns the backing commits made. A run of them is one extent (one handle) with
    /// an extent growth policy; for holds, the last run reaches past last_unit as far as the
    /// growth rate says (extent_sizer) and those units become spares. Units in flight or
    /// committed are skipped. Under quota pressure it first gives back this pool's own spares
    /// outside [first_unit, last_unit] and its kept handles, then asks the budget's other models.
    /// `committed`, when given, gets the extents this call committed appended (a caller that
    /// commits several ranges rolls them all back on a later failure). Room made under quota
    /// pressure spares [keep_first, keep_last] (default: the range), so it never gives back
    /// what the same call committed.
    std::size_t commit_range(std::size_t first_unit, std::size_t last_unit, commit_mode mode,
                             std::vector<std::size_t>* committed = nullptr, std::size_t keep_first = SIZE_MAX,
                             std::size_t keep_last = 0) {
        if (keep_first == SIZE_MAX) {
            keep_first = first_unit;
            keep_last = last_unit;
        }
        const std::size_t most = max_extent_units_of(growth_);
        const auto sizer_before = sizer_;
        std::vector<std::size_t> done;  // first units of the extents this call committed
        try {
            for (std::size_t u = first_unit; u <= last_unit;) {
                if (table_.state[u] != detail::unit_state::uncommitted) {
                    ++u;
                    continue;
                }
                std::size_t needed = 1;
                while (needed < most && u + needed <= last_unit &&
                       table_.state[u + needed] == detail::unit_state::uncommitted) {
                    ++needed;
                }
                std::size_t n = needed;
                const auto now = clock::now();
                const bool for_holds = mode == commit_mode::for_holds;
                if (for_holds && most > 1 && u + needed > last_unit) {  // the end of the range: grow ahead as fast as demand comes
                    const std::size_t want = sizer_.size_at(now);
                    while (n < want && u + n < units_ && table_.state[u + n] == detail::unit_state::uncommitted) {
                        ++n;
                    }
                }
                n = commit_extent(u, n, needed, keep_first, keep_last);
                if (for_holds) {
                    sizer_.committed(now);  // growth one hold at a time: what the sizer follows
                }
                done.push_back(u);
                for (std::size_t a = for_holds ? std::max(u, last_unit + 1) : u; a < u + n; ++a) {
                    make_idle(a);  // committed ahead: spares
                }
                u += n;
            }
            if (committed != nullptr) {
                committed->insert(committed->end(), done.begin(), done.end());
            }
        } catch (...) {
            roll_back(done);
            sizer_ = sizer_before;  // after the rollback's decommits, which are no churn
            throw;
        }
        return done.size();
    }
    /// Decommits the extents in `done` (committed by the failing call, held by nothing), newest first.
    void roll_back(std::vector<std::size_t>& done) noexcept {
        while (!done.empty()) {
            const std::size_t f = done.back();
            done.pop_back();
            if (table_.state[f] != detail::unit_state::committed || table_.extent_first[f] != f) {
                continue;  // not this call's extent any more (given back meanwhile): nothing to undo
            }
            forget_extent_idle(f);
            try {
                (void)decommit_extent(f);
            } catch (...) {
                // a spare again, or retired (decommit_extent says which): accounted either way
            }
        }
    }

    /// Commits units [u, u + n) as one extent; when a quota or the device refuses more than the
    /// `needed` first units, commits just those (making room for them). Returns the units committed.
    std::size_t commit_extent(std::size_t u, std::size_t n, std::size_t needed, std::size_t keep_first,
                              std::size_t keep_last) {
        // The `needed` units draw on this thread's prepaid charge (prepay) first; only what it
        // does not cover goes to the quota, and the prepaid part is taken once the commit holds.
        const std::size_t prepaid = prepaid_owner_ == std::this_thread::get_id()
                                        ? std::min(prepaid_, extent_bytes(u, needed))
                                        : 0;
        if (n > needed) {
            const std::size_t extra = extent_bytes(u, n) - prepaid;
            try {
                charge(extra);  // units ahead of demand never push other memory out
                try {
                    std::lock_guard backing_lock(backing_mutex_);
                    backing_commit(u, n);
                } catch (...) {
                    uncharge(extra);
                    throw;
                }
                prepaid_ -= prepaid;
                note_committed(u, n, false);
                return n;
            } catch (const over_quota&) {
            } catch (const out_of_memory&) {
            }
        }
        const std::size_t rest = extent_bytes(u, needed) - prepaid;
        if (rest > 0) {
            charge_making_room(rest, keep_first, keep_last);
        }
        try {
            std::lock_guard backing_lock(backing_mutex_);
            backing_commit(u, needed);
        } catch (...) {
            uncharge(rest);
            throw;
        }
        prepaid_ -= prepaid;
        note_committed(u, needed, false);
        return needed;
    }
    /// A prepaid_charge ends: what its commits did not draw goes back to the quota.
    void end_prepaid() noexcept {
        std::lock_guard lock(mutex_);
        uncharge(std::exchange(prepaid_, 0));
        prepaid_owner_ = std::thread::id{};
    }

    /// Charges `bytes`; when the quota refuses, makes room and tries again: first with this
    /// pool's own spares and kept handles (outside [keep_first, keep_last]) or, failing that,
    /// the other models' spares; then once more with the other models' spares; last, with a
    /// quota shared by processes (process_quota), by asking the other processes for theirs.
    void charge_making_room(std::size_t bytes, std::size_t keep_first, std::size_t keep_last) {
        for (int attempt = 0;; ++attempt) {
            try {
                charge(bytes);
                return;
            } catch (const over_quota&) {
                const bool made_room = (attempt == 0 && give_back_spares(keep_first, keep_last) > 0) ||
                                       (attempt < 2 && reclaim_from_other_models() > 0);
                if (!made_room) {
                    if constexpr (requires { quota_.acquire_asking_processes(bytes); }) {
                        quota_.acquire_asking_processes(bytes);  // throws over_quota as charge did
                        charged_ += bytes;
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
            return quota_.reclaim_from_others();
        } else {
            return 0;
        }
    }

    /// Decommits the extent that starts at unit `first` (idle, its units no longer in
    /// table_.idle) on the caller's thread, which holds mutex_; returns the bytes uncharged. If
    /// the backing fails, the extent becomes spares again or is retired (settle_failed_decommit)
    /// and the error propagates.
    std::size_t decommit_extent(std::size_t first) {
        std::size_t freed = 0;
        {
            std::lock_guard backing_lock(backing_mutex_);
            const std::size_t backing_before = backing_.committed_bytes();  // to tell what a failure left
            try {
                freed = backing_decommit(first);
            } catch (...) {
                settle_failed_decommit(first, backing_.committed_bytes() == backing_before);
                throw;
            }
        }
        note_decommitted(first);
        return freed;
    }
    /// After the backing threw from decommitting the extent at `first` (out of table_.idle, state
    /// committed or decommitting): if the backing still has all of it committed, nothing was
    /// given back and its units are spares again, to be tried again later; otherwise part of it
    /// went and it is retired. The caller holds mutex_.
    void settle_failed_decommit(std::size_t first, bool still_committed) {
        ++stats_.decommit_failures;
        if (still_committed) {
            set_extent_state(first, detail::unit_state::committed);
            for (std::size_t u = first; u < first + table_.extent_units[first]; ++u) {
                make_idle(u);
            }
        } else {
            retire(first);
        }
    }
    /// Takes the committed extent at `first` out of service after a failed decommit: it may
    /// still be mapped, so it is never mapped, handed out or decommitted again, and stays charged.
    void retire(std::size_t first) noexcept {  // counted in decommit_failures by the caller
        set_extent_state(first, detail::unit_state::retired);
        table_.committed -= table_.extent_units[first];
        stats_.committed -= extent_bytes_of(first);
        stats_.retired_units += table_.extent_units[first];
        stats_.retired_bytes += extent_bytes_of(first);
    }

    /// Asks which fences completed (never waits). A fence whose work failed means the context is
    /// lost; the error propagates and the units behind it stay committed.
    void poll_fences() {
        if (fences_.pending() > 0) {
            (void)fences_.poll();
        }
    }
    /// Whether unit u's memory may go back: no GPU work queued before its releases is pending.
    [[nodiscard]] bool gpu_done_with(std::size_t u) const noexcept { return fences_.is_complete(table_.fences[u]); }
    /// The same for every unit of the extent that starts at `first`.
    [[nodiscard]] bool gpu_done_with_extent(std::size_t first) const noexcept {
        for (std::size_t u = first; u < first + table_.extent_units[first]; ++u) {
            if (!gpu_done_with(u)) {
                return false;
            }
        }
        return true;
    }

    /// Whether an extent idle as a whole stays committed only because its GPU work is pending.
    [[nodiscard]] bool idle_memory_awaits_gpu() const noexcept {
        return std::any_of(table_.idle_extents.begin(), table_.idle_extents.end(),
                           [&](std::size_t f) { return !gpu_done_with_extent(f); });
    }

    /// Decommits extents that are idle as a whole and whose GPU work is done, highest offset
    /// first, until at most `keep` idle units remain (or none is left that may go); returns the
    /// bytes uncharged.
    std::size_t shrink(std::size_t keep) {
        std::size_t freed = 0;
        if constexpr (growth_type::is_elastic) {
            if (table_.idle.size() <= keep) {
                return 0;
            }
            poll_fences();
            for (auto it = table_.idle_extents.end(); table_.idle.size() > keep && it != table_.idle_extents.begin();) {
                --it;
                const std::size_t f = *it;
                if (!gpu_done_with_extent(f)) {
                    continue;  // stays spares, charged, until its fences complete
                }
                it = table_.idle_extents.erase(it);
                forget_extent_idle(f);
                freed += decommit_extent(f);
            }
        }
        return freed;
    }

    /// Gives back extents idle as a whole outside [keep_first, keep_last] whose GPU work is done,
    /// and kept handles; returns the bytes uncharged.
    std::size_t give_back_spares(std::size_t keep_first, std::size_t keep_last) noexcept {
        if constexpr (!growth_type::is_elastic) {
            return 0;
        } else {
            std::size_t freed = 0;
            try {
                poll_fences();
            } catch (...) {
                // a lost context: give back only what no fence holds
            }
            for (auto it = table_.idle_extents.begin(); it != table_.idle_extents.end();) {
                const std::size_t f = *it;
                const std::size_t end = f + table_.extent_units[f];  // one past its last unit
                if ((f <= keep_last && end > keep_first) || !gpu_done_with_extent(f)) {
                    ++it;
                    continue;
                }
                it = table_.idle_extents.erase(it);
                forget_extent_idle(f);
                try {
                    freed += decommit_extent(f);
                } catch (...) {
                    // spares again or retired, counted in stats(); the other spares still go back
                }
            }
            freed += drop_kept_handles();
            stop_refilling();
            return freed;
        }
    }

    /// How long another model's reclaim waits for this pool's lock before it gives up on it. A
    /// busy pool is usually busy for microseconds (bookkeeping, one driver call); waiting a
    /// bounded time keeps two pools that reclaim from each other free of deadlock.
    static constexpr std::chrono::milliseconds reclaim_wait{20};

    /// Another model of the budget was refused: give every spare back. A busy pool is waited for
    /// up to reclaim_wait, then skipped (the other model's commit then fails with over_quota);
    /// for another process's request (detail::reclaim_without_waiting) it is skipped at once.
    std::size_t give_back_for_others() noexcept {
        std::unique_lock lock(mutex_, std::defer_lock);
        const auto give_up =
            clock::now() + (detail::reclaim_without_waiting ? std::chrono::milliseconds(0) : reclaim_wait);
        while (!lock.try_lock()) {
            if (clock::now() > give_up) {
                return 0;
            }
            std::this_thread::sleep_for(std::chrono::microseconds(20));
        }
        const std::size_t freed = give_back_spares(units_, units_);
        stats_.reclaims += freed > 0 ? 1 : 0;
        return freed;
    }

    // --- the background mapper (its decisions: vmmpp/growth/mapper.hpp) ---

    /// The mapper takes the pool's lock by spinning on try_lock for a while: a thread blocked on
    /// a mutex makes its owner's unlock a system call, and the owner is usually a caller on its
    /// critical path, done in about a microsecond. A holder that keeps it longer (synchronize,
    /// with_backing, a quota's reclaim) is waited for asleep, not at 100 % of a core.
    static void lock_spinning(std::unique_lock<mutex_type>& lock) {
        const auto give_up = clock::now() + std::chrono::microseconds(50);
        for (unsigned i = 1; !lock.try_lock(); ++i) {
            adaptive_mutex::cpu_relax();
            if (i % 64 == 0 && clock::now() > give_up) {
                lock.lock();
                return;
            }
        }
    }

    void mapper_loop() {
        if constexpr (context_binding_backing<backing_type>) {
            try {
                backing_.bind_current_thread();
            } catch (...) {
                // each backing call then pushes and pops the context itself
            }
        }
        auto& plan = mapper_.plan;
        std::unique_lock lock(mutex_);
        while (!mapper_.stopping) {
            if (const auto u = plan.next_to_map(table_)) {
                const auto started = clock::now();
                const std::size_t want = sizer_.size_at(started);
                std::size_t n = 1;
                while (n < want && *u + n < units_ && table_.state[*u + n] == detail::unit_state::uncommitted) {
                    ++n;
                }
                for (std::size_t a = *u; a < *u + n; ++a) {
                    table_.state[a] = detail::unit_state::committing;
                }
                plan.commit_started(n);
                lock.unlock();
                bool ok = false;
                try {
                    charge(extent_bytes(*u, n));  // no room made: spares never push other memory out
                    try {
                        std::lock_guard backing_lock(backing_mutex_);
                        backing_commit(*u, n);
                        ok = true;
                    } catch (...) {
                        uncharge(extent_bytes(*u, n));
                    }
                } catch (...) {
                    // over quota or out of memory: stop refilling until demand comes back
                }
                lock_spinning(lock);
                plan.commit_finished(n);
                if (ok) {
                    note_committed(*u, n, true);
                    sizer_.committed(started);
                    for (std::size_t a = *u; a < *u + n; ++a) {
                        make_idle(a);
                    }
                } else {
                    for (std::size_t a = *u; a < *u + n; ++a) {
                        table_.state[a] = detail::unit_state::uncommitted;
                    }
                    ++stats_.mapper_failures;
                    plan.stop_refilling();
                }
                mapper_.settled.notify_all();
                continue;
            }
            std::optional<clock::time_point> deadline;
            const auto gpu_done = [this](std::size_t unit) {
                const std::size_t first = table_.extent_first[unit];
                if (!gpu_done_with_extent(first)) {
                    try {
                        poll_fences();
                    } catch (...) {
                        // a lost context: the unit stays a spare
                    }
                }
                return gpu_done_with_extent(first);
            };
            if (const auto u = plan.next_to_release(table_, clock::now(), deadline, gpu_done)) {
                const std::size_t first = table_.extent_first[*u];
                if (!table_.idle_extents.contains(first)) {
                    continue;  // part of its extent is held: it goes back with the last of them
                }
                forget_extent_idle(first);
                set_extent_state(first, detail::unit_state::decommitting);
                lock.unlock();
                bool ok = false;
                bool still_committed = true;
                {
                    std::lock_guard backing_lock(backing_mutex_);
                    const std::size_t backing_before = backing_.committed_bytes();
                    try {
                        (void)backing_decommit(first);
                        ok = true;
                    } catch (...) {
                        still_committed = backing_.committed_bytes() == backing_before;
                    }
                }
                lock_spinning(lock);
                if (ok) {
                    note_decommitted(first);
                    ++stats_.mapper_decommits;
                } else {
                    settle_failed_decommit(first, still_committed);
                    ++stats_.mapper_failures;
                }
                mapper_.settled.notify_all();
                continue;
            }
            const auto now = clock::now();
            if (plan.growing(now)) {
                // Growing lately: poll without the lock (callers never meet the mapper on it and
                // never wake it), until a refill is wanted, a release is due, or a while passed.
                const auto look_again = std::min(deadline.value_or(clock::time_point::max()), now + plan.release_delay());
                lock.unlock();
                do {
                    std::this_thread::sleep_for(growth_.poll_interval);
                } while (!mapper_.stopping.load(std::memory_order_relaxed) && !plan.refilling() &&
                         clock::now() < look_again);
                lock_spinning(lock);
                continue;
            }
            // Quiet: sleep until woken (demand, shutdown) or the next lazy release is due.
            mapper_.waiting = true;
            mapper_.has_deadline = deadline.has_value();
            if (deadline) {
                mapper_.wake.wait_until(lock, *deadline);
            } else {
                mapper_.wake.wait(lock);
            }
            mapper_.waiting = false;
        }
    }

    backing_type backing_;
    growth_type growth_;
    quota_type quota_;
    mutable mutex_type mutex_;
    mutable backing_mutex_type backing_mutex_;
    const std::size_t page_bytes_;
    const std::size_t pages_;
    const std::size_t unit_pages_;
    const std::size_t units_;
    std::vector<std::uint32_t> page_holds_;  // per page: how many holds
    detail::unit_table table_;               // per unit: state, held pages, fence; the idle set
    detail::fence_queue fences_;
    const std::uint64_t id_ = next_pool_id();  // names this pool's fences
    std::uint64_t agent_client_ = 0;           // this pool's id with the release agent, once it needed it
    detail::range_counts range_holds_;       // debug builds: holds per byte
    std::size_t held_pages_ = 0;
    std::atomic<std::size_t> charged_{0};        // bytes acquired from the quota
    std::size_t prepaid_ = 0;                     // of charged_: prepay's, not backing anything yet
    std::thread::id prepaid_owner_{};             // the thread whose commits draw on prepaid_
    std::atomic<std::size_t> kept_snapshot_{0};  // the backing's kept handle bytes, after its last call
    std::atomic<std::int64_t> driver_ns_{0};
    pool_stats stats_;
    /// The background mapper's decisions and thread state; nothing at all without one.
    [[no_unique_address]] std::conditional_t<has_mapper, detail::background_mapper<clock>, no_mapper> mapper_;
    detail::extent_sizer<clock> sizer_;  // how many units the next commit covers (one, without extents)
};

} // namespace vmmpp
