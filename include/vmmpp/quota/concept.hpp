// vmmpp/quota/concept.hpp: who may commit how much. A pool asks its quota before every commit
// and tells it after every decommit.
#pragma once

#include <concepts>
#include <cstddef>
#include <functional>

namespace vmmpp {

/// A quota policy: `acquire(bytes)` takes bytes from the quota or throws vmmpp::over_quota and
/// changes nothing; `release(bytes)` gives them back and never throws.
template <class Q>
concept quota_policy = std::copy_constructible<Q> && requires(Q& q, std::size_t n) {
    { q.acquire(n) } -> std::same_as<void>;
    { q.release(n) } noexcept -> std::same_as<void>;
};

/// An optional capability of a quota shared by several pools: a pool registers how to give its
/// spare memory back (`set_reclaimer`, undone by `clear_reclaimer`, which waits for a call in
/// progress), and a pool refused by the quota asks every other registered pool to give theirs
/// back (`reclaim_from_others`, returning the bytes they gave back). A pool uses it when its
/// quota models this and its mutex is real.
template <class Q>
concept reclaiming_quota = quota_policy<Q> && requires(Q& q) {
    q.set_reclaimer(std::function<std::size_t()>{});
    { q.clear_reclaimer() } noexcept;
    { q.reclaim_from_others() } -> std::same_as<std::size_t>;
};

/// An optional capability beside reclaiming_quota: soft memory lent to other models. A holder
/// of memory that is in use but may be dropped (a prefix cache's evictable blocks:
/// vmmpp/prefix/lending.hpp) registers how to drop about `bytes` of it (`set_cache_reclaimer`:
/// the function evicts until at least that many bytes of its pool's pages hold nothing, or it
/// has nothing left, and returns the page bytes it emptied; undone by `clear_cache_reclaimer`,
/// which waits for a call in progress). A pool refused by the quota calls
/// `reclaim_cached_from_others(bytes)` for a commit of `bytes` only after the spare reclaimers
/// (reclaim_from_others) made no room: the quota asks other models' cache reclaimers for the
/// shortfall under the limit that refused (nothing when only the pool's own model limit
/// refused, which other models' memory cannot help), then has those models' pools give the
/// emptied pages back, and returns the bytes given back to the quota. Never throws. So the
/// order under pressure is: own spares, other pools' spares, other models' cached blocks, then
/// over_quota.
template <class Q>
concept cache_reclaiming_quota = reclaiming_quota<Q> && requires(Q& q, std::size_t n) {
    q.set_cache_reclaimer(std::function<std::size_t(std::size_t)>{});
    { q.clear_cache_reclaimer() } noexcept;
    { q.reclaim_cached_from_others(n) } noexcept -> std::same_as<std::size_t>;
};

namespace detail {
/// Set on a thread that gives memory back for another process's reclaim request (a process
/// budget's watcher): a pool whose lock is busy is skipped at once instead of being waited for
/// (elastic_pool::reclaim_wait), since its holder may be waiting for this very answer and a busy
/// pool is not the idle one the request is for.
inline thread_local bool reclaim_without_waiting = false;
} // namespace detail

} // namespace vmmpp
