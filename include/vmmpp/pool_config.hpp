// vmmpp/pool_config.hpp: what a pool is made of (pool_config: backing, growth, quota, mutex) and
// the small types of its interface: byte ranges, committed extents, fences, statistics.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/adaptive_mutex.hpp"
#include "vmmpp/growth/concept.hpp"
#include "vmmpp/growth/mapped_ahead.hpp"
#include "vmmpp/quota/concept.hpp"

namespace vmmpp {

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

} // namespace vmmpp
