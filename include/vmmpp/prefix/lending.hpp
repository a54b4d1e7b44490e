// vmmpp/prefix/lending.hpp: a prefix cache's evictable blocks lent to other models of its budget.
//
// A model on a shared budget (vmmpp::shared_budget) or a process budget (vmmpp::process_quota)
// whose commit is refused takes, in this order: its own pool's spares, the other pools' spares,
// the other models' evictable cached blocks (whole pages, about the shortfall: this file), and
// only then fails with over_quota. Another process's cached blocks come through its watcher
// thread (process_budget_options::reclaim_watch), with no call in that process. Live blocks
// (held by a sequence) are never touched: only blocks the prefix cache alone holds are lent.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <thread>
#include <utility>

#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/quota/concept.hpp"

namespace vmmpp {

/// What a prefix_lending gave other models since it was made.
struct lending_stats {
    std::uint64_t lends = 0;       ///< reclaims that evicted something for another model
    std::uint64_t lent_blocks = 0; ///< blocks those reclaims evicted
    std::size_t lent_bytes = 0;    ///< bytes of pages those reclaims emptied
    std::uint64_t busy = 0;        ///< reclaims that gave up on the owner's lock (owner busy past the wait)
};

/// Registers the evictable blocks of `Prefix` (a vmmpp::prefix_cache) as soft memory other
/// models of its pool's budget may reclaim (vmmpp::cache_reclaiming_quota), until it goes.
///
/// Locking contract. The reclaim runs on another thread (the refused model's, or a process
/// budget's watcher) while the owner may be using its caches, so the reclaim evicts only while
/// holding the owner's mutex (this object's own, or one the engine already serialises its calls
/// with, given to the constructor: the C ABI passes its cache's). It waits for it at most `wait`
/// (not at all for another process's request: detail::reclaim_without_waiting), then skips this
/// cache (the refused commit goes on to the next lender, or over_quota); meanwhile the owner's
/// lock(), with() and wrappers yield to it (give_way). The owner must hold the same lock around
/// EVERY call on the prefix cache and its kv_cache, reads included (block_table, tokens,
/// lookup, stats, address: eviction changes the block tables and the prefix maps they read):
/// use the wrappers below (append, free, fork, truncate, publish, attach, lookup), `with`,
/// or hold lock() around a batch. Unsafe: any call on either cache outside the lock while a
/// prefix_lending exists. Safe without the lock: kernels on the GPU reading blocks of live
/// sequences (a lent block is held by no sequence; its memory goes back only after the
/// streams that read it, see below), and the pool's own thread-safe calls.
///
/// Deadlock freedom: the reclaim holds no budget or registry lock while it evicts (the budget
/// calls it after releasing its own); eviction takes this object's mutex (bounded wait), then
/// the lender's pool lock (kv_cache::release_block), then the budget's lock (release). An owner
/// refused under this lock reclaims from other models only, never from itself.
///
/// Stream order: eviction goes through kv_cache::release_block, so an evicted block's pages go
/// back only after the streams its last readers used (the fences free left). On a device, pages
/// whose work is still queued stay committed: the reclaim empties fewer bytes than asked, and
/// the refused commit may fail with over_quota although blocks were evicted; the pages come back
/// at the lender pool's next collect, release or reclaim, so the refused caller should retry
/// (prefix_cache::append's own retries, or the engine's next step).
///
/// Lifetime: it must go before the prefix cache and the owner's mutex; its destructor
/// unregisters, waiting for a reclaim in progress (do not hold the lock there). Not copyable or
/// movable (the registered reclaimer points at it).
template <class Prefix>
class prefix_lending {
public:
    using prefix_type = Prefix;
    using cache_type = typename Prefix::cache_type;
    using quota_type = typename cache_type::pool_type::quota_type;
    static_assert(cache_reclaiming_quota<quota_type>,
                  "vmmpp::prefix_lending: the pool's quota lends nothing to other models (not a vmmpp::cache_reclaiming_quota: "
                  "use vmmpp::shared_budget or vmmpp::process_quota)");
    static_assert(cache_type::pool_type::growth_type::is_elastic,
                  "vmmpp::prefix_lending: a preallocated pool gives no memory back, so evicting its blocks lends nothing");

    /// How long a reclaim waits for the owner's lock by default: as long as a pool's
    /// (elastic_pool::reclaim_wait).
    static constexpr std::chrono::milliseconds default_wait{20};

    /// Lends `prefix`'s evictable blocks through a copy of its pool's quota (a share of the same
    /// model with a cache-reclaimer slot of its own).
    /// Throws: std::bad_alloc (nothing registered).
    explicit prefix_lending(Prefix& prefix, std::chrono::milliseconds wait = default_wait)
        : prefix_lending(prefix, nullptr, wait) {}
    /// The same, the reclaim locking `owner_mutex` (the mutex every call of the engine on the
    /// caches already holds; lock() and the wrappers lock it too). It must outlive this object.
    prefix_lending(Prefix& prefix, std::mutex& owner_mutex, std::chrono::milliseconds wait = default_wait)
        : prefix_lending(prefix, &owner_mutex, wait) {}
    prefix_lending(const prefix_lending&) = delete;
    prefix_lending& operator=(const prefix_lending&) = delete;
    /// Unregisters; waits for a reclaim in progress. Do not hold lock() here.
    ~prefix_lending() { quota_.clear_cache_reclaimer(); }

    /// The owner's lock (see the class comment): hold it around any call on the caches.
    /// A reclaim waiting for it goes first (see give_way).
    [[nodiscard]] std::unique_lock<std::mutex> lock() {
        give_way();
        return std::unique_lock(*mutex_);
    }
    /// f(prefix cache) under the lock (a waiting reclaim first).
    template <class F>
    decltype(auto) with(F&& f) {
        give_way();
        std::lock_guard held(*mutex_);
        return std::forward<F>(f)(prefix_);
    }

    // --- the engine's calls, each under the lock ---

    token_range append(seq_id seq, std::size_t n_tokens) { return with([&](Prefix& p) { return p.append(seq, n_tokens); }); }
    token_range append(seq_id seq, std::size_t n_tokens, cudaStream_t stream) {
        return with([&](Prefix& p) { return p.append(seq, n_tokens, stream); });
    }
    void free(seq_id seq) { with([&](Prefix& p) { p.free(seq); }); }
    void free(seq_id seq, cudaStream_t stream) { with([&](Prefix& p) { p.free(seq, stream); }); }
    [[nodiscard]] seq_id add_sequence() { return with([](Prefix& p) { return p.cache().add_sequence(); }); }
    [[nodiscard]] seq_id fork(seq_id seq) { return with([&](Prefix& p) { return p.cache().fork(seq); }); }
    void truncate(seq_id seq, std::size_t n_tokens, cudaStream_t stream) {
        with([&](Prefix& p) { p.cache().truncate(seq, n_tokens, stream); });
    }
    std::size_t publish(seq_id seq, std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) {
        return with([&](Prefix& p) { return p.publish(seq, tokens, extra); });
    }
    attached_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) {
        return with([&](Prefix& p) { return p.attach(tokens, extra); });
    }
    attached_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                             cudaStream_t stream) {
        return with([&](Prefix& p) { return p.attach(tokens, extra, stream); });
    }
    [[nodiscard]] std::size_t lookup(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) {
        return with([&](const Prefix& p) { return p.lookup(tokens, extra); });
    }

    /// What this object lent so far (any thread).
    [[nodiscard]] lending_stats stats() const noexcept {
        return {lends_.load(), lent_blocks_.load(), lent_bytes_.load(), busy_.load()};
    }
    [[nodiscard]] std::chrono::milliseconds wait() const noexcept { return wait_; }

private:
    prefix_lending(Prefix& prefix, std::mutex* owner_mutex, std::chrono::milliseconds wait)
        : prefix_(prefix), wait_(wait), mutex_(owner_mutex != nullptr ? owner_mutex : &own_mutex_),
          quota_(prefix.cache().pool().quota()) {
        quota_.set_cache_reclaimer([this](std::size_t bytes) noexcept { return lend(bytes); });
    }

    /// Before the owner takes its lock: while a reclaim polls for it, yields (up to the wait).
    /// A std::mutex is not fair, and an owner calling in a loop would win it every time: the
    /// reclaim would skip a cache that is busy only between short calls.
    void give_way() const noexcept {
        if (waiting_.load(std::memory_order_acquire) == 0) {
            return;
        }
        const auto until = std::chrono::steady_clock::now() + wait_;
        while (waiting_.load(std::memory_order_acquire) > 0 && std::chrono::steady_clock::now() < until) {
            std::this_thread::yield();
        }
    }

    /// The cache reclaimer: evicts whole page groups until `bytes` of pages are empty (or none is
    /// left), under the owner's lock. Returns the page bytes emptied.
    std::size_t lend(std::size_t bytes) noexcept {
        std::unique_lock held(*mutex_, std::defer_lock);
        if (!held.try_lock()) {
            if (detail::reclaim_without_waiting) {
                busy_.fetch_add(1);
                return 0;
            }
            const auto give_up = std::chrono::steady_clock::now() + wait_;
            waiting_.fetch_add(1, std::memory_order_acq_rel);
            bool got = false;
            while (!(got = held.try_lock()) && std::chrono::steady_clock::now() <= give_up) {
                std::this_thread::sleep_for(std::chrono::microseconds(20));
            }
            waiting_.fetch_sub(1, std::memory_order_acq_rel);
            if (!got) {
                busy_.fetch_add(1);
                return 0;
            }
        }
        std::size_t evicted = 0;
        std::size_t emptied = 0;
        try {
            const eviction_result r = prefix_.evict_bytes(bytes);
            evicted = r.blocks.size();
            emptied = r.freed_page_bytes;
        } catch (...) {
            // asleep, or the device failed giving memory back: nothing more to lend now (blocks
            // evicted before the failure are gone from the cache, their memory with the pool)
            return 0;
        }
        if (evicted > 0) {
            lends_.fetch_add(1);
            lent_blocks_.fetch_add(evicted);
            lent_bytes_.fetch_add(emptied);
        }
        return emptied;
    }

    Prefix& prefix_;
    std::chrono::milliseconds wait_;
    std::mutex own_mutex_;  // the owner's lock unless one was given
    std::mutex* mutex_;
    std::atomic<std::uint64_t> lends_{0}, lent_blocks_{0}, busy_{0};
    std::atomic<unsigned> waiting_{0};  // reclaims polling for the owner's lock now
    std::atomic<std::size_t> lent_bytes_{0};
    quota_type quota_;  // last: unregistered first, while the members its reclaimer uses live
};

} // namespace vmmpp
