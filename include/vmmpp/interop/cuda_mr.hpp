// vmmpp/interop/cuda_mr.hpp: an elastic pool as a CCCL memory resource (cuda::mr), so code written
// against cuda::mr (RMM, Thrust, CUB, cuda::mr::resource_ref) allocates from a vmmpp pool and its
// physical memory follows what those allocations hold.
//
//   vmmpp::budget budget(64ull << 30);
//   vmmpp::elastic_pool<vmmpp::elastic_config> pool(64ull << 30, {}, {}, budget.register_model("mr", 8ull << 30));
//   vmmpp::pool_memory_resource mr(pool);
//   cuda::mr::resource_ref<cuda::mr::device_accessible> ref{mr};   // CCCL 2.x and 3.0 spelling
//   void* p = ref.allocate(1000, 256);
//
// The pool commits pages under held byte ranges and counts holds per page (ranges may share a
// page), so the resource is a sub-allocator over the pool's reserved span: each allocation is
// rounded up to a multiple of 256 bytes (cudaMalloc's alignment, CCCL's
// default_cuda_malloc_alignment) and placed first-fit by address in a map of free ranges,
// coalesced on free. It holds its bytes in the pool (elastic_pool::ensure_committed), so the pages
// under live allocations are committed and a page goes back (as the growth policy says) once no
// allocation lies on it. First fit by address keeps allocations low in the span, so its top stays
// uncommitted. Byte-exact holds rather than whole pages per allocation: small allocations share
// a page instead of each pinning 2 MiB. A search walks the free ranges, which stay few while
// allocations come and go in order (a workload of very many small, scattered allocations wants a
// sub-allocator of its own on top, as RMM's pool_memory_resource).
//
// Stream order, as the pool's own: deallocate_async(p, ..., stream) records a fence on `stream`
// and releases the range after it, so its pages are not given back before the work queued on
// `stream` has completed; the range itself is not handed out again before then either (a new
// owner could write it under the old one's reads). An allocation that finds no room otherwise
// takes those ranges back early: allocate_async makes its stream wait for their fences
// (cuStreamWaitEvent), so work it queues there runs after them; allocate waits for them on the
// caller's thread (elastic_pool::synchronize), as cudaMalloc would. The synchronous deallocate
// says no queued GPU work touches the memory any more (elastic_pool::release without a stream).
// Host memory needs no fences: its ranges are free again at once.
//
// Properties: cuda::mr::device_accessible where the pool's backing declares
// vmmpp::device_accessible (vmm, device, managed_prefetch), cuda::mr::host_accessible where it
// declares vmmpp::host_accessible (host, pinned_host, managed_prefetch); the vmmpp properties too.
//
// CCCL's names: CCCL 2.x and 3.0 (CUDA 12, CUDA 13.0) call the synchronous concept `resource`
// (allocate(bytes, alignment)) and the stream-ordered one `async_resource` (allocate_async(bytes,
// alignment, stream)), both behind LIBCUDACXX_ENABLE_EXPERIMENTAL_MEMORY_RESOURCE, which this
// header defines before it includes <cuda/memory_resource> (a translation unit that included it
// earlier without the macro has no cuda::mr: define it on the command line then). Later CCCL (3.5,
// in newer CUDA 13 toolkits) calls them `synchronous_resource` (allocate_sync) and `resource`
// (allocate(stream, bytes, alignment)), with no macro. The resource has every member both name,
// so it models whichever the CCCL at hand defines.
//
// Errors are vmmpp's: over_quota and out_of_memory when the pool cannot commit (nothing is
// allocated), out_of_memory when no free range of the span fits (its limit() is the span's
// capacity), invalid_argument for an alignment that is not a power of two and for deallocating a
// pointer this resource did not hand out or with another size, cuda_error from the driver. CCCL
// lets allocation functions throw; its resource_ref::deallocate is noexcept, so a deallocate
// that throws through a resource_ref ends the program.
//
// Lifetime: the resource borrows the pool, which must outlive every copy of it. Copies share one
// free-range map and compare equal (memory from one may be given to another); resources made
// separately over the same pool compare unequal, and must not be, since each hands out the span
// on its own. Allocations still live when the last copy goes stay held until the pool goes.
// Thread safety: every member may be called concurrently; the driver's commits run outside the
// resource's lock.
#pragma once

#ifndef LIBCUDACXX_ENABLE_EXPERIMENTAL_MEMORY_RESOURCE
#define LIBCUDACXX_ENABLE_EXPERIMENTAL_MEMORY_RESOURCE
#endif

#if !__has_include(<cuda/memory_resource>)
#error "vmmpp/interop/cuda_mr.hpp needs CCCL's <cuda/memory_resource> on the include path (CUDA 13: <toolkit>/include/cccl)"
#endif

#include <cuda/memory_resource>
#include <cuda/stream_ref>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp {

namespace detail {
/// Whether a pool over `Backing` has property `P` (CCCL's or vmmpp's name for it).
template <class Backing, class P>
inline constexpr bool mr_declares =
    ((std::same_as<P, ::cuda::mr::device_accessible> || std::same_as<P, vmmpp::device_accessible>) &&
     vmmpp::has_property<Backing, vmmpp::device_accessible>) ||
    ((std::same_as<P, ::cuda::mr::host_accessible> || std::same_as<P, vmmpp::host_accessible>) &&
     vmmpp::has_property<Backing, vmmpp::host_accessible>);
} // namespace detail

/// A CCCL memory resource over an elastic_pool: see the file comment.
template <class Config>
class pool_memory_resource {
public:
    using pool_type = elastic_pool<Config>;
    using backing_type = typename Config::backing_type;
    /// Every allocation starts on, and is sized in, multiples of this (cudaMalloc's alignment).
    static constexpr std::size_t granule = 256;

    explicit pool_memory_resource(elastic_pool<Config>& pool) : s_(std::make_shared<state>(pool)) {}

    /// `bytes` (0 counts as 1) aligned to `alignment` (a power of two; below 256 counts as 256),
    /// committed and usable at once, by the host too where the backing is host accessible.
    /// Throws: invalid_argument, out_of_memory, over_quota, cuda_error. Nothing allocated on throw.
    /// Waits: for the GPU work behind earlier deallocate_async calls, only when nothing else fits.
    void* allocate(std::size_t bytes, std::size_t alignment = granule) {
        return s_->allocate(bytes, alignment, std::nullopt);
    }
    /// Gives back memory from allocate or allocate_async that no queued GPU work touches any more
    /// (else deallocate_async). `bytes` as allocated; the alignment plays no part.
    /// Throws: invalid_argument (not this resource's, or another size; nothing changed);
    /// cuda_error when the pool fails to decommit (the memory is given back all the same).
    void deallocate(void* p, std::size_t bytes, std::size_t alignment = granule) {
        (void)alignment;
        s_->deallocate(p, bytes, std::nullopt);
    }
    /// As allocate; work queued on `stream` afterwards may use it. When only ranges whose
    /// deallocate_async fences are pending would fit, `stream` is made to wait for those fences
    /// instead of the caller's thread. Throws: as allocate.
    void* allocate_async(std::size_t bytes, std::size_t alignment, ::cuda::stream_ref stream) {
        return s_->allocate(bytes, alignment, stream.get());
    }
    /// As deallocate, for memory that work queued on `stream` may still touch: its pages and its
    /// range come back once that work has completed; the caller's thread does not wait.
    /// Throws: as deallocate, and cuda_error when the fence cannot be recorded (nothing changed).
    void deallocate_async(void* p, std::size_t bytes, std::size_t alignment, ::cuda::stream_ref stream) {
        (void)alignment;
        s_->deallocate(p, bytes, stream.get());
    }

    // The same, under the names later CCCL (3.5) gives them.
    void* allocate_sync(std::size_t bytes, std::size_t alignment = granule) { return allocate(bytes, alignment); }
    void deallocate_sync(void* p, std::size_t bytes, std::size_t alignment = granule) {
        deallocate(p, bytes, alignment);
    }
    void* allocate(::cuda::stream_ref stream, std::size_t bytes, std::size_t alignment = granule) {
        return allocate_async(bytes, alignment, stream);
    }
    void deallocate(::cuda::stream_ref stream, void* p, std::size_t bytes, std::size_t alignment = granule) {
        deallocate_async(p, bytes, alignment, stream);
    }

    /// Copies of one resource are equal; see the file comment.
    friend bool operator==(const pool_memory_resource& a, const pool_memory_resource& b) noexcept {
        return a.s_ == b.s_;
    }
    friend bool operator!=(const pool_memory_resource& a, const pool_memory_resource& b) noexcept {
        return !(a == b);
    }

    /// The properties the backing declares, as CCCL and vmmpp name them.
    template <class P>
        requires(detail::mr_declares<backing_type, P>)
    friend constexpr void get_property(const pool_memory_resource&, P) noexcept {}

    [[nodiscard]] pool_type& pool() const noexcept { return s_->pool; }
    /// Bytes handed out and not deallocated (each allocation rounded up to the granule).
    [[nodiscard]] std::size_t allocated_bytes() const {
        std::lock_guard lock(s_->mutex);
        return s_->allocated;
    }
    /// Bytes deallocated with deallocate_async whose fences have not been seen complete yet.
    [[nodiscard]] std::size_t pending_bytes() const {
        std::lock_guard lock(s_->mutex);
        std::size_t n = 0;
        for (const pending_range& r : s_->pending) {
            n += r.bytes;
        }
        return n;
    }

private:
    struct pending_range {
        std::size_t offset;
        std::size_t bytes;
        pool_fence after;
    };

    struct state {
        explicit state(pool_type& p) : pool(p) {
            if (pool.capacity() > 0) {
                free.emplace(0, pool.capacity());
            }
        }

        void* allocate(std::size_t bytes, std::size_t alignment, std::optional<cudaStream_t> stream) {
            if (alignment == 0 || !std::has_single_bit(alignment)) {
                throw invalid_argument("pool_memory_resource::allocate: alignment " + std::to_string(alignment) +
                                       " is not a power of two");
            }
            if (bytes > pool.capacity()) {
                throw out_of_memory("pool_memory_resource: larger than the pool's span", bytes, pool.committed_bytes(),
                                    pool.capacity());
            }
            const std::size_t size = round_up(bytes == 0 ? 1 : bytes);
            alignment = std::max(alignment, granule);
            std::unique_lock lock(mutex);
            take_completed();
            std::optional<std::size_t> at = find_fit(size, alignment);
            if (!at && !pending.empty()) {
                if (stream) {
                    // Stream order: work queued on `stream` from now on runs after every pending
                    // fence, so their ranges are free for it (make_wait drops the completed ones).
                    std::vector<pool_fence> fences;
                    for (const pending_range& r : pending) {
                        fences.push_back(r.after);
                    }
                    pool.make_wait(*stream, fences);
                    take_all_pending();
                } else {
                    lock.unlock();
                    (void)pool.synchronize();  // as cudaMalloc: the caller's thread waits for the GPU
                    lock.lock();
                    take_completed();
                }
                at = find_fit(size, alignment);
            }
            if (!at) {
                throw out_of_memory("pool_memory_resource: no free range of the pool's span fits " + std::to_string(size) +
                                        " bytes aligned to " + std::to_string(alignment),
                                    size, pool.committed_bytes(), pool.capacity());
            }
            carve(*at, size);
            live.emplace(*at, size);
            allocated += size;
            lock.unlock();
            try {
                pool.ensure_committed(*at, size);  // the driver, outside the lock: the range is ours
            } catch (...) {
                lock.lock();
                live.erase(*at);
                allocated -= size;
                give_free(*at, size);
                throw;
            }
            return pool.base() + *at;
        }

        void deallocate(void* p, std::size_t bytes, std::optional<cudaStream_t> stream) {
            const auto addr = reinterpret_cast<std::uintptr_t>(p);
            const auto base = reinterpret_cast<std::uintptr_t>(pool.base());
            std::lock_guard lock(mutex);
            const auto it = addr >= base ? live.find(addr - base) : live.end();
            if (it == live.end()) {
                throw invalid_argument("pool_memory_resource::deallocate: " + pointer_text(p) +
                                       " was not allocated by this resource, or was deallocated already");
            }
            const std::size_t offset = it->first;
            const std::size_t size = it->second;
            if (round_up(bytes == 0 ? 1 : bytes) != size) {
                throw invalid_argument("pool_memory_resource::deallocate: " + pointer_text(p) + " deallocated as " +
                                       std::to_string(bytes) + " bytes; it was allocated as " + std::to_string(size) +
                                       " (rounded to " + std::to_string(granule) + ")");
            }
            const pool_fence after = stream ? pool.record_fence(*stream) : pool_fence{};  // throws: nothing changed
            live.erase(it);
            allocated -= size;
            if (after.value == 0) {
                give_free(offset, size);  // no queued work (or host memory: no fences)
            } else {
                pending.push_back({offset, size, after});
            }
            pool.release(offset, size, after);  // a cuda_error here: released all the same
        }

        static std::size_t round_up(std::size_t n) noexcept { return (n + granule - 1) / granule * granule; }
        static std::string pointer_text(const void* p) {
            char buf[2 * sizeof(std::uintptr_t) + 3];
            std::snprintf(buf, sizeof buf, "%p", p);
            return std::string("pointer ") + buf;
        }

        /// The lowest offset where `size` bytes fit at an address aligned to `alignment`.
        std::optional<std::size_t> find_fit(std::size_t size, std::size_t alignment) const {
            const auto base = reinterpret_cast<std::uintptr_t>(pool.base());
            const std::uintptr_t mask = alignment - 1;
            for (const auto& [offset, bytes] : free) {
                if (base + offset > UINTPTR_MAX - mask) {
                    break;  // no address above fits the alignment
                }
                const std::uintptr_t aligned = (base + offset + mask) & ~mask;
                const std::size_t at = aligned - base;
                if (at - offset <= bytes && bytes - (at - offset) >= size) {
                    return at;
                }
            }
            return std::nullopt;
        }
        /// Takes [at, at+size) out of the free range holding it; what is left either side stays free.
        void carve(std::size_t at, std::size_t size) {
            auto it = std::prev(free.upper_bound(at));
            const std::size_t offset = it->first;
            const std::size_t bytes = it->second;
            free.erase(it);
            if (at > offset) {
                free.emplace(offset, at - offset);
            }
            if (at + size < offset + bytes) {
                free.emplace(at + size, offset + bytes - (at + size));
            }
        }
        /// Puts [offset, offset+bytes) back, merged with free neighbours.
        void give_free(std::size_t offset, std::size_t bytes) {
            auto next = free.lower_bound(offset);
            if (next != free.end() && next->first == offset + bytes) {
                bytes += next->second;
                next = free.erase(next);
            }
            if (next != free.begin()) {
                auto prev = std::prev(next);
                if (prev->first + prev->second == offset) {
                    prev->second += bytes;
                    return;
                }
            }
            free.emplace(offset, bytes);
        }
        /// Frees the ranges whose fences have completed (asks the driver, never waits).
        void take_completed() {
            std::erase_if(pending, [&](const pending_range& r) {
                if (!pool.is_complete(std::span<const pool_fence>(&r.after, 1))) {
                    return false;
                }
                give_free(r.offset, r.bytes);
                return true;
            });
        }
        void take_all_pending() {
            for (const pending_range& r : pending) {
                give_free(r.offset, r.bytes);
            }
            pending.clear();
        }

        pool_type& pool;
        mutable std::mutex mutex;
        std::map<std::size_t, std::size_t> free;           // offset -> bytes, none adjacent
        std::unordered_map<std::size_t, std::size_t> live;  // offset -> bytes, as handed out
        std::vector<pending_range> pending;                 // deallocate_async'd, fences pending
        std::size_t allocated = 0;
    };

    std::shared_ptr<state> s_;
};

template <class Config>
pool_memory_resource(elastic_pool<Config>&) -> pool_memory_resource<Config>;

} // namespace vmmpp
