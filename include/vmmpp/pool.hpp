// vmmpp/pool.hpp: elastic_pool<Config>: one reserved span whose physical memory follows what is
// held in it. Callers hold byte ranges (a KV block, say); the pool commits the pages under them
// through the backing, charged to the quota, in units the growth policy chooses, and gives
// pages back when nothing holds them any more.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/growth/concept.hpp"
#include "vmmpp/quota/concept.hpp"

namespace vmmpp {

/// A mutex that does nothing, for pools only ever used from one thread.
struct null_mutex {
    void lock() noexcept {}
    void unlock() noexcept {}
    bool try_lock() noexcept { return true; }
};

/// A pool's compile-time configuration: where bytes come from, how the pool grows and shrinks,
/// who may commit how much, and the mutex that makes it thread safe (`null_mutex` for none).
template <class Backing, class Growth, class Quota, class Mutex = std::mutex>
struct pool_config {
    static_assert(backing<Backing>, "vmmpp::pool_config: Backing does not model vmmpp::backing");
    static_assert(growth_policy<Growth>, "vmmpp::pool_config: Growth does not model vmmpp::growth_policy");
    static_assert(quota_policy<Quota>, "vmmpp::pool_config: Quota does not model vmmpp::quota_policy");
    static_assert(Backing::is_elastic || !Growth::is_elastic,
                  "vmmpp::pool_config: an elastic growth policy over a fixed backing (device, external) would only "
                  "pretend to give memory back; use vmmpp::preallocated");

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
    std::uint64_t commits = 0;        ///< backing commit calls
    std::uint64_t decommits = 0;      ///< backing decommit calls
    std::chrono::nanoseconds driver_time{0};  ///< time spent inside the backing's commit/decommit
};

/// An elastic pool over one backing.
///
/// Thread safety: every member function may be called concurrently from any threads; they
/// serialise on `Config::mutex_type` (the driver serialises VMM calls anyway: DESIGN.md).
/// `base()`, `capacity()` and `page_bytes()` never change and take no lock.
template <class Config>
class elastic_pool {
public:
    using config = Config;
    using backing_type = typename Config::backing_type;
    using growth_type = typename Config::growth_type;
    using quota_type = typename Config::quota_type;
    using mutex_type = typename Config::mutex_type;

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
          unit_held_pages_(units_, 0),
          unit_committed_(units_, false) {
        stats_.reserved = backing_.capacity();
        if constexpr (!growth_type::is_elastic) {
            std::vector<std::size_t> all(units_);
            for (std::size_t u = 0; u < units_; ++u) {
                all[u] = u;
                idle_.insert(u);
            }
            commit_units(all, 0, 0);
        }
    }
    elastic_pool(const elastic_pool&) = delete;
    elastic_pool& operator=(const elastic_pool&) = delete;

    /// Gives every committed unit back (to the backing and the quota).
    ~elastic_pool() {
        for (std::size_t u = 0; u < units_; ++u) {
            if (unit_committed_[u]) {
                try {
                    backing_.decommit(unit_offset(u), unit_bytes(u));
                } catch (...) {
                    // The backing frees everything in its own destructor; only the quota matters here.
                }
                quota_.release(unit_bytes(u));
            }
        }
    }

    /// Holds [offset, offset+bytes): commits every page under it that is not committed yet.
    /// The range need not be page aligned; pages are held by count, so ranges may share pages.
    /// Strong guarantee: if a commit or the quota fails, every unit this call committed is
    /// decommitted again and nothing is held; the error (out_of_memory, over_quota, cuda_error)
    /// propagates. One exception: spare units the pool gave back to make room under quota
    /// pressure stay given back (nothing held them).
    void ensure_committed(std::size_t offset, std::size_t bytes) {
        check_range("ensure_committed", offset, bytes);
        std::lock_guard lock(mutex_);
        const std::size_t first_page = offset / page_bytes_;
        const std::size_t last_page = (offset + bytes - 1) / page_bytes_;
        const std::size_t first_unit = first_page / unit_pages_;
        const std::size_t last_unit = last_page / unit_pages_;
        bool all_committed = true;
        for (std::size_t u = first_unit; u <= last_unit && all_committed; ++u) {
            all_committed = unit_committed_[u];
        }
        if (!all_committed) {  // the common case (a block on a committed page) allocates nothing
            std::vector<std::size_t> missing;
            for (std::size_t u = first_unit; u <= last_unit; ++u) {
                if (!unit_committed_[u]) {
                    missing.push_back(u);
                }
            }
            commit_units(missing, first_unit, last_unit);
        }
        for (std::size_t p = first_page; p <= last_page; ++p) {
            if (page_holds_[p]++ == 0) {
                ++held_pages_;
                if (unit_held_pages_[p / unit_pages_]++ == 0) {
                    idle_.erase(p / unit_pages_);
                }
            }
        }
    }

    /// Lets go of [offset, offset+bytes), held before with ensure_committed. Pages nothing holds
    /// any more go back as the growth policy says. Releasing a range that is not held (a double
    /// release) is an invalid_argument and changes nothing. If the backing fails to decommit,
    /// the release has still taken effect (the page stays committed as a spare) and the error
    /// propagates.
    void release(std::size_t offset, std::size_t bytes) {
        check_range("release", offset, bytes);
        std::lock_guard lock(mutex_);
        const std::size_t first_page = offset / page_bytes_;
        const std::size_t last_page = (offset + bytes - 1) / page_bytes_;
        for (std::size_t p = first_page; p <= last_page; ++p) {
            if (page_holds_[p] == 0) {
                throw invalid_argument("release of [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                       "): the page at offset " + std::to_string(p * page_bytes_) +
                                       " is not held (released twice?)");
            }
        }
        for (std::size_t p = first_page; p <= last_page; ++p) {
            if (--page_holds_[p] == 0) {
                --held_pages_;
                if (--unit_held_pages_[p / unit_pages_] == 0) {
                    idle_.insert(p / unit_pages_);
                }
            }
        }
        shrink(growth_.idle_units_to_keep(committed_units_, idle_.size()));
    }

    /// Gives back every committed unit nothing holds, spares included (e.g. when another model
    /// needs the budget). Returns the bytes given back. A preallocated pool gives nothing back.
    std::size_t trim() {
        std::lock_guard lock(mutex_);
        if constexpr (!growth_type::is_elastic) {
            return 0;
        } else {
            const std::size_t before = stats_.committed;
            shrink(0);
            return before - stats_.committed;
        }
    }

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
        return u < units_ && unit_committed_[u];
    }
    /// Byte offset and length of unit `u` within the span.
    [[nodiscard]] std::size_t unit_offset_of(std::size_t u) const noexcept { return unit_offset(u); }
    [[nodiscard]] std::size_t unit_bytes_of(std::size_t u) const noexcept { return unit_bytes(u); }

    [[nodiscard]] std::size_t committed_bytes() const {
        std::lock_guard lock(mutex_);
        return stats_.committed;
    }
    /// Whether every page under [offset, offset+bytes) is committed.
    [[nodiscard]] bool is_committed(std::size_t offset, std::size_t bytes) const {
        check_range("is_committed", offset, bytes);
        std::lock_guard lock(mutex_);
        for (std::size_t p = offset / page_bytes_; p <= (offset + bytes - 1) / page_bytes_; ++p) {
            if (!unit_committed_[p / unit_pages_]) {
                return false;
            }
        }
        return true;
    }
    [[nodiscard]] pool_stats stats() const {
        std::lock_guard lock(mutex_);
        pool_stats s = stats_;
        s.held_pages = held_pages_;
        s.idle_units = idle_.size();
        return s;
    }

    /// The quota this pool charges (e.g. to read a shared_budget's statistics).
    [[nodiscard]] const quota_type& quota() const noexcept { return quota_; }
    /// The backing, for what only it knows (a vmm backing's handle count, say).
    [[nodiscard]] const backing_type& backing() const noexcept { return backing_; }

private:
    void check_range(const char* operation, std::size_t offset, std::size_t bytes) const {
        if (bytes == 0 || offset >= stats_.reserved || bytes > stats_.reserved - offset) {
            throw invalid_argument(std::string(operation) + " of [" + std::to_string(offset) + ", +" +
                                   std::to_string(bytes) + "): empty or beyond the pool's capacity " +
                                   std::to_string(stats_.reserved) + " bytes");
        }
    }

    [[nodiscard]] std::size_t unit_offset(std::size_t u) const noexcept { return u * unit_pages_ * page_bytes_; }
    [[nodiscard]] std::size_t unit_bytes(std::size_t u) const noexcept {
        return (std::min(pages_, (u + 1) * unit_pages_) - u * unit_pages_) * page_bytes_;
    }

    template <class F>
    void timed(F&& f) {
        const auto start = std::chrono::steady_clock::now();
        try {
            f();
        } catch (...) {
            stats_.driver_time += std::chrono::steady_clock::now() - start;
            throw;
        }
        stats_.driver_time += std::chrono::steady_clock::now() - start;
    }

    /// Commits every unit in `units`, or none of them. Under quota pressure it first gives back
    /// this pool's own spare units outside [keep_first, keep_last].
    void commit_units(const std::vector<std::size_t>& units, std::size_t keep_first, std::size_t keep_last) {
        std::size_t done = 0;
        try {
            for (std::size_t u : units) {
                commit_unit(u, keep_first, keep_last);
                ++done;
            }
        } catch (...) {
            while (done > 0) {
                const std::size_t u = units[--done];
                try {
                    decommit_unit(u);
                } catch (...) {
                    idle_.insert(u);  // still committed: keep it as a spare, accounted
                }
            }
            throw;
        }
    }

    void commit_unit(std::size_t u, std::size_t keep_first, std::size_t keep_last) {
        const std::size_t bytes = unit_bytes(u);
        try {
            quota_.acquire(bytes);
        } catch (const over_quota&) {
            if (!give_back_spares(keep_first, keep_last)) {
                throw;
            }
            quota_.acquire(bytes);
        }
        try {
            timed([&] { backing_.commit(unit_offset(u), bytes); });
        } catch (...) {
            quota_.release(bytes);
            throw;
        }
        unit_committed_[u] = true;
        ++committed_units_;
        ++stats_.commits;
        stats_.committed += bytes;
        stats_.peak_committed = std::max(stats_.peak_committed, stats_.committed);
    }

    void decommit_unit(std::size_t u) {
        const std::size_t bytes = unit_bytes(u);
        timed([&] { backing_.decommit(unit_offset(u), bytes); });
        quota_.release(bytes);
        unit_committed_[u] = false;
        --committed_units_;
        ++stats_.decommits;
        stats_.committed -= bytes;
    }

    /// Decommits idle units, highest offset first, until at most `keep` remain.
    void shrink(std::size_t keep) {
        if constexpr (growth_type::is_elastic) {
            while (idle_.size() > keep) {
                const std::size_t u = *idle_.rbegin();
                decommit_unit(u);
                idle_.erase(u);
            }
        }
    }

    /// Gives back idle units outside [keep_first, keep_last]; true if it gave any back.
    bool give_back_spares(std::size_t keep_first, std::size_t keep_last) {
        if constexpr (!growth_type::is_elastic) {
            return false;
        } else {
            bool any = false;
            for (auto it = idle_.begin(); it != idle_.end();) {
                if (*it >= keep_first && *it <= keep_last) {
                    ++it;
                    continue;
                }
                decommit_unit(*it);
                it = idle_.erase(it);
                any = true;
            }
            return any;
        }
    }

    backing_type backing_;
    growth_type growth_;
    quota_type quota_;
    mutable mutex_type mutex_;
    const std::size_t page_bytes_;
    const std::size_t pages_;
    const std::size_t unit_pages_;
    const std::size_t units_;
    std::vector<std::uint32_t> page_holds_;       // per page: how many holds
    std::vector<std::uint32_t> unit_held_pages_;  // per unit: how many of its pages are held
    std::vector<bool> unit_committed_;
    std::set<std::size_t> idle_;                  // committed units nothing holds
    std::size_t committed_units_ = 0;
    std::size_t held_pages_ = 0;
    pool_stats stats_;
};

} // namespace vmmpp
