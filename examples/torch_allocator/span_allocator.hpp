// span_allocator.hpp: a thread-safe first-fit allocator over one elastic_pool's reserved span,
// with stream-ordered frees: what examples/torch_allocator hands PyTorch as its CUDA allocator,
// and what tests/python/test_span_allocator.cpp runs on the host backing.
//
// Blocks are rounded up to 512 bytes and carved first-fit (lowest address first, so live memory
// stays packed at the bottom and emptied pages at the top go back). An allocation holds its pages
// with pool.ensure_committed; a free records an event on the freeing stream and the block waits
// in a pending list: it is neither reused nor its pages released until the event says that the
// work queued on that stream before the free has finished. Frees complete (pages released,
// range back on the free list, coalesced) when a later call finds their event done, or when an
// allocation finds no room and waits for them.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp_torch {

/// How a free waits for its stream: `record(stream)` marks the stream's position now,
/// `done(event)` says whether the stream got past it, `wait(event)` blocks until it did, and
/// `recycle(event)` takes back an event nobody waits on any more (it must not throw).
template <class E>
concept event_policy = requires(E& e, typename E::stream_type s, typename E::event_type ev) {
    { e.record(s) } -> std::same_as<typename E::event_type>;
    { e.done(ev) } -> std::same_as<bool>;
    { e.wait(ev) } -> std::same_as<void>;
    { e.recycle(ev) } noexcept -> std::same_as<void>;
};

/// CUDA events (timing disabled), kept in a free list so that frees do not create events.
/// Events belong to the device current when they are created: use one instance per device.
class cuda_events {
public:
    using stream_type = cudaStream_t;
    using event_type = cudaEvent_t;

    cuda_events() = default;
    cuda_events(cuda_events&& other) noexcept : spare_(std::move(other.spare_)) {}
    cuda_events& operator=(cuda_events&&) = delete;
    ~cuda_events() {
        for (cudaEvent_t e : spare_) {
            (void)::cudaEventDestroy(e);
        }
    }

    event_type record(stream_type stream) {
        cudaEvent_t e = nullptr;
        if (spare_.empty()) {
            vmmpp::driver::check(::cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
        } else {
            e = spare_.back();
            spare_.pop_back();
        }
        if (const cudaError_t rc = ::cudaEventRecord(e, stream); rc != cudaSuccess) {
            recycle(e);
            vmmpp::driver::check(rc, "cudaEventRecord");
        }
        return e;
    }
    bool done(event_type e) {
        const cudaError_t rc = ::cudaEventQuery(e);
        if (rc == cudaErrorNotReady) {
            (void)::cudaGetLastError();  // "not ready" is an answer, not an error to keep
            return false;
        }
        vmmpp::driver::check(rc, "cudaEventQuery");
        return true;
    }
    void wait(event_type e) { vmmpp::driver::check(::cudaEventSynchronize(e), "cudaEventSynchronize"); }
    void recycle(event_type e) noexcept {
        try {
            spare_.push_back(e);
        } catch (...) {
            (void)::cudaEventDestroy(e);
        }
    }

private:
    std::vector<cudaEvent_t> spare_;
};

static_assert(event_policy<cuda_events>);

/// A snapshot of a span_allocator.
struct span_allocator_stats {
    std::size_t capacity = 0;         ///< bytes of the span
    std::size_t live_bytes = 0;       ///< bytes of live blocks (rounded to the alignment)
    std::size_t live_blocks = 0;
    std::size_t peak_live_bytes = 0;
    std::size_t pending_frees = 0;    ///< freed blocks whose stream has not passed the free yet
    std::size_t pending_bytes = 0;
    std::size_t free_ranges = 0;      ///< the free list's length (fragmentation)
    std::size_t largest_free = 0;     ///< bytes of the largest free range
    std::size_t committed_bytes = 0;  ///< the pool's committed bytes
};

/// First-fit allocator over an elastic_pool<Config>'s span, frees ordered by `Events`.
/// Every member function may be called from any thread (one mutex).
template <class Config, event_policy Events>
class span_allocator {
public:
    using pool_type = vmmpp::elastic_pool<Config>;
    using stream_type = typename Events::stream_type;
    using event_type = typename Events::event_type;
    /// Every block starts at, and is a whole multiple of, this many bytes.
    static constexpr std::size_t alignment = 512;

    /// A pool of `capacity` bytes (a multiple of the backing's granularity) built with the
    /// backing's options and the growth policy, and the event policy frees wait with.
    explicit span_allocator(std::size_t capacity, typename Config::backing_type::options backing_options = {},
                            typename Config::growth_type growth = {}, Events events = {})
        : pool_(capacity, std::move(backing_options), std::move(growth)), events_(std::move(events)) {
        free_.emplace(0, pool_.capacity() / alignment * alignment);
    }
    span_allocator(const span_allocator&) = delete;
    span_allocator& operator=(const span_allocator&) = delete;
    /// Waits for every pending free; live blocks go with the pool.
    ~span_allocator() {
        for (pending& p : pending_) {
            try {
                events_.wait(p.event);
            } catch (...) {
                // nothing left to protect: the pool is going
            }
            events_.recycle(p.event);
        }
    }

    /// A block of at least `bytes` bytes (nullptr for 0), its pages committed. When the span has
    /// no free range large enough, or committing fails, it waits for pending frees and tries
    /// again; then throws vmmpp::out_of_memory (span full) or the pool's error (device memory,
    /// quota). `stream` is where the caller will use it (unused: a new block is idle).
    [[nodiscard]] void* allocate(std::size_t bytes, stream_type stream = {}) {
        (void)stream;
        if (bytes == 0) {
            return nullptr;
        }
        if (bytes > std::numeric_limits<std::size_t>::max() - (alignment - 1)) {
            throw vmmpp::out_of_memory("span_allocator", bytes, live_bytes_, pool_.capacity());
        }
        const std::size_t n = (bytes + alignment - 1) / alignment * alignment;
        std::lock_guard lock(mutex_);
        reclaim_locked();
        for (;;) {
            auto it = first_fit(n);
            if (it != free_.end()) {
                try {
                    pool_.ensure_committed(it->first, n);
                } catch (const vmmpp::error&) {
                    if (pending_.empty()) {
                        throw;
                    }
                    wait_all_locked();  // pages of pending frees go back; try again
                    continue;
                }
                const std::size_t offset = it->first;
                try {
                    live_.emplace(offset, n);
                } catch (...) {
                    pool_.release(offset, n);
                    throw;
                }
                carve(it, n);  // cannot throw
                live_bytes_ += n;
                peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
                return pool_.base() + offset;
            }
            if (pending_.empty()) {
                throw vmmpp::out_of_memory("span_allocator: no free range of " + std::to_string(n) + " bytes", n,
                                           live_bytes_, pool_.capacity());
            }
            wait_oldest_locked();
        }
    }

    /// Frees a block from allocate, after the work queued on `stream` so far: the block is not
    /// reused, nor its pages released, before then. nullptr is ignored; a pointer this
    /// allocator did not hand out, or a size other than the one it was allocated with, is
    /// vmmpp::invalid_argument and changes nothing.
    void deallocate(void* p, std::size_t bytes, stream_type stream = {}) {
        if (p == nullptr) {
            return;
        }
        std::lock_guard lock(mutex_);
        const auto address = reinterpret_cast<std::uintptr_t>(p);
        const auto base = reinterpret_cast<std::uintptr_t>(pool_.base());
        const std::size_t offset = address - base;
        auto it = address >= base ? live_.find(offset) : live_.end();
        if (it == live_.end()) {
            throw vmmpp::invalid_argument("span_allocator: free of a pointer it did not allocate (or freed twice)");
        }
        if ((bytes + alignment - 1) / alignment * alignment != it->second) {
            throw vmmpp::invalid_argument("span_allocator: free of " + std::to_string(bytes) + " bytes, allocated as " +
                                          std::to_string(it->second));
        }
        const event_type event = events_.record(stream);
        try {
            pending_.push_back(pending{offset, it->second, event});
        } catch (...) {
            events_.recycle(event);
            throw;
        }
        pending_bytes_ += it->second;
        live_bytes_ -= it->second;
        live_.erase(it);
        reclaim_locked();
    }

    /// Completes every pending free whose stream is past it. Returns how many it completed.
    std::size_t reclaim() {
        std::lock_guard lock(mutex_);
        return reclaim_locked();
    }

    /// Waits for every pending free, completes them and gives the pool's spare pages back.
    /// Returns the bytes given back.
    std::size_t trim() {
        std::lock_guard lock(mutex_);
        wait_all_locked();
        return pool_.trim();
    }

    [[nodiscard]] span_allocator_stats stats() const {
        std::lock_guard lock(mutex_);
        span_allocator_stats s;
        s.capacity = pool_.capacity();
        s.live_bytes = live_bytes_;
        s.live_blocks = live_.size();
        s.peak_live_bytes = peak_live_bytes_;
        s.pending_frees = pending_.size();
        s.pending_bytes = pending_bytes_;
        s.free_ranges = free_.size();
        for (const auto& [offset, bytes] : free_) {
            s.largest_free = std::max(s.largest_free, bytes);
        }
        s.committed_bytes = pool_.committed_bytes();
        return s;
    }

    [[nodiscard]] const pool_type& pool() const noexcept { return pool_; }
    [[nodiscard]] Events& events() noexcept { return events_; }

private:
    struct pending {
        std::size_t offset;
        std::size_t bytes;
        event_type event;
    };
    using free_list = std::map<std::size_t, std::size_t>;  // offset -> bytes, never adjacent

    typename free_list::iterator first_fit(std::size_t n) {
        for (auto it = free_.begin(); it != free_.end(); ++it) {
            if (it->second >= n) {
                return it;
            }
        }
        return free_.end();
    }

    /// Takes the first `n` bytes of a free range.
    void carve(typename free_list::iterator it, std::size_t n) noexcept {
        if (it->second == n) {
            free_.erase(it);
            return;
        }
        // Re-key the rest: extract the node and reuse it, so nothing allocates.
        auto node = free_.extract(it);
        node.key() += n;
        node.mapped() -= n;
        free_.insert(std::move(node));
    }

    /// Puts [offset, offset + n) back on the free list, merged with its neighbours. Strong
    /// guarantee (only a new, unmerged node allocates).
    void give_back(std::size_t offset, std::size_t n) {
        auto next = free_.lower_bound(offset);
        const bool joins_next = next != free_.end() && offset + n == next->first;
        if (next != free_.begin()) {
            auto prev = std::prev(next);
            if (prev->first + prev->second == offset) {
                prev->second += n;
                if (joins_next) {
                    prev->second += next->second;
                    free_.erase(next);
                }
                return;
            }
        }
        if (joins_next) {
            auto node = free_.extract(next);
            node.key() = offset;
            node.mapped() += n;
            free_.insert(std::move(node));
            return;
        }
        free_.emplace(offset, n);
    }

    /// Completes pending free `it` (its event is done): pages released, range given back.
    typename std::deque<pending>::iterator complete(typename std::deque<pending>::iterator it) {
        give_back(it->offset, it->bytes);  // may throw: then it stays pending
        try {
            pool_.release(it->offset, it->bytes);
        } catch (const vmmpp::error&) {
            // The release took effect; only giving a page back to the device failed: it stays a
            // committed spare of the pool.
        }
        pending_bytes_ -= it->bytes;
        events_.recycle(it->event);
        return pending_.erase(it);
    }

    std::size_t reclaim_locked() {
        std::size_t completed = 0;
        for (auto it = pending_.begin(); it != pending_.end();) {
            if (events_.done(it->event)) {
                it = complete(it);
                ++completed;
            } else {
                ++it;
            }
        }
        return completed;
    }

    void wait_oldest_locked() {
        events_.wait(pending_.front().event);
        complete(pending_.begin());
        reclaim_locked();
    }

    void wait_all_locked() {
        while (!pending_.empty()) {
            wait_oldest_locked();
        }
    }

    mutable std::mutex mutex_;
    pool_type pool_;
    Events events_;
    free_list free_;
    std::unordered_map<std::size_t, std::size_t> live_;  // offset -> bytes
    std::deque<pending> pending_;                        // in the order of the frees
    std::size_t live_bytes_ = 0;
    std::size_t peak_live_bytes_ = 0;
    std::size_t pending_bytes_ = 0;
};

} // namespace vmmpp_torch
