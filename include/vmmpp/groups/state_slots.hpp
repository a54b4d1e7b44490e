// vmmpp/groups/state_slots.hpp: state_slots<Config>, a fixed-size state per sequence (a Mamba or
// gated-delta-net layer's conv + SSM state) in an elastic pool of its own: a slot is held as a
// sequence starts and given back as it ends, in stream order, so the state-space layers of a
// hybrid model take what their live sequences need and no KV-sized block each
// (vmmpp/groups/kv_groups.hpp puts them beside the attention layers' caches).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/kv/block_fences.hpp"
#include "vmmpp/kv/cache_options.hpp"
#include "vmmpp/kv/detail/device_copy.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp {

/// Slots of `slot_bytes` bytes, one per live sequence, at fixed addresses in an elastic_pool:
/// slot i lies at data(i) = base + i * slot_stride() (slot_bytes rounded up to 256 bytes, so a
/// kernel reads every slot aligned), and the pages under the slots in use are committed.
///
/// Stream order, as kv_cache's blocks: a slot's memory goes back, and the slot is written again,
/// only after the work queued on every stream that may still read it (the stream given to
/// release(), and to fork() for the copy's read of its source).
///
/// Thread safety: as a standard container (the pool and its budget are thread safe).
/// Guarantee: strong for every call, except that spare pages the pool gave back to make room
/// stay given back, and that a CUDA failure while giving memory back in release() leaves the
/// release done (the pool retires that memory).
template <class Config>
class state_slots {
public:
    using pool_type = elastic_pool<Config>;
    using backing_type = typename Config::backing_type;
    static constexpr std::size_t alignment = 256;

    /// Room for `max_slots` slots of `slot_bytes` bytes (address space only; nothing committed).
    /// Throws: invalid_argument (a zero size, or sizes that overflow), and what the pool's
    /// constructor throws.
    explicit state_slots(std::size_t slot_bytes, std::uint32_t max_slots,
                         typename backing_type::options backing_options = {}, typename Config::growth_type growth = {},
                         typename Config::quota_type quota = {}, kv_cache_options options = {})
        : slot_bytes_(checked_slot_bytes(slot_bytes, max_slots)),
          stride_((slot_bytes_ + alignment - 1) / alignment * alignment),
          max_slots_(max_slots),
          options_(options),
          pool_(span_bytes(stride_, max_slots, options.span_alignment), std::move(backing_options), std::move(growth),
                std::move(quota)),
          fences_(max_slots),
          copy_(pool_.device()) {}

    state_slots(const state_slots&) = delete;
    state_slots& operator=(const state_slots&) = delete;

    /// The lowest free slot, its memory held, for a new sequence; work queued on `stream` after
    /// the call may write it (the reads queued before its last release come first). Its bytes are
    /// what its memory held: the engine initialises the state.
    /// Throws: out_of_blocks (every slot in use), over_quota, out_of_memory, retired_memory,
    /// cuda_error; nothing changed.
    [[nodiscard]] std::uint32_t acquire(cudaStream_t stream) {
        const std::uint32_t slot = lowest_free();
        pool_.ensure_committed(offset_of(slot), slot_bytes_);  // strong: nothing held on failure
        try {
            if constexpr (stream_ordered) {
                pool_.make_wait(stream, fences_.of_mutable(static_cast<std::int32_t>(slot)));
            }
        } catch (...) {
            pool_.release(offset_of(slot), slot_bytes_);  // nothing was queued on it
            throw;
        }
        take(slot);  // nothrow
        return slot;
    }
    /// acquire(kv_cache_options::stream).
    [[nodiscard]] std::uint32_t acquire() { return acquire(options_.stream); }

    /// A new slot holding a copy of slot `from`'s bytes (a forked sequence's state), copied on
    /// `stream` after the work queued there (the state's last write); `from` goes back only
    /// after the copy has read it.
    /// Throws: invalid_argument (`from` not in use), and as acquire(); nothing changed.
    [[nodiscard]] std::uint32_t fork(std::uint32_t from, cudaStream_t stream) {
        check_in_use("fork", from);
        fences_.reserve_one_more(static_cast<std::int32_t>(from));  // the copy's fence cannot fail to fit
        const std::uint32_t to = acquire(stream);
        try {
            copy_.copy(stream, "cuMemcpyAsync(state slot fork)", [&](auto&& copy) {
                copy(data(to), data(from), slot_bytes_);
            });
            if constexpr (stream_ordered) {
                fences_.add(static_cast<std::int32_t>(from), pool_.record_fence(stream));
            }
        } catch (...) {
            release_noexcept(to, stream);
            throw;
        }
        return to;
    }

    /// Gives slot `slot` back: its memory goes back (as the growth policy says) once the work
    /// queued on `stream` so far, and every earlier reader, has completed. The caller's thread
    /// does not wait.
    /// Throws: invalid_argument (not in use; nothing changed); cuda_error recording the fence
    /// (nothing changed) or giving memory back (the release has taken effect).
    void release(std::uint32_t slot, cudaStream_t stream) {
        check_in_use("release", slot);
        auto& fences = fences_.of_mutable(static_cast<std::int32_t>(slot));
        if constexpr (stream_ordered) {
            fences.reserve(fences.size() + 1);
            block_fences::add_to(fences, pool_.record_fence(stream));  // may throw: nothing changed
        }
        give(slot);  // may throw: nothing changed but the fence kept
        const byte_range range{offset_of(slot), slot_bytes_};
        pool_.release(std::span<const byte_range>(&range, 1), std::span<const pool_fence>(fences));
    }
    /// release(slot, kv_cache_options::stream).
    void release(std::uint32_t slot) { release(slot, options_.stream); }

    /// The first byte of slot `slot` (in use or not: its address never changes).
    [[nodiscard]] std::byte* data(std::uint32_t slot) const {
        if (slot >= max_slots_) {
            throw invalid_argument("state slot " + std::to_string(slot) + " out of range (max_slots " +
                                   std::to_string(max_slots_) + ")");
        }
        return pool_.base() + offset_of(slot);
    }
    [[nodiscard]] bool in_use(std::uint32_t slot) const noexcept { return slot < max_slots_ && in_use_[slot] != 0; }
    [[nodiscard]] std::size_t slot_bytes() const noexcept { return slot_bytes_; }
    /// Bytes from one slot to the next (slot_bytes rounded up to 256).
    [[nodiscard]] std::size_t slot_stride() const noexcept { return stride_; }
    [[nodiscard]] std::uint32_t max_slots() const noexcept { return max_slots_; }
    [[nodiscard]] std::size_t used_slots() const noexcept { return used_; }
    [[nodiscard]] const pool_type& pool() const noexcept { return pool_; }
    [[nodiscard]] pool_type& pool() noexcept { return pool_; }

private:
    static constexpr bool stream_ordered = has_property<backing_type, device_accessible>;

    static std::size_t checked_slot_bytes(std::size_t slot_bytes, std::uint32_t max_slots) {
        if (slot_bytes == 0) throw invalid_argument("state_slots: slot_bytes must not be zero");
        if (max_slots == 0) throw invalid_argument("state_slots: max_slots must not be zero");
        if (max_slots > static_cast<std::uint32_t>(std::numeric_limits<std::int32_t>::max()) ||
            slot_bytes > std::numeric_limits<std::size_t>::max() / 2 / max_slots) {
            throw invalid_argument("state_slots: " + std::to_string(max_slots) + " slots of " +
                                   std::to_string(slot_bytes) + " bytes overflow the address space");
        }
        return slot_bytes;
    }
    static std::size_t span_bytes(std::size_t stride, std::uint32_t max_slots, std::size_t span_alignment) {
        const std::size_t bytes = stride * max_slots;
        return (bytes + span_alignment - 1) / span_alignment * span_alignment;
    }
    [[nodiscard]] std::size_t offset_of(std::uint32_t slot) const noexcept { return std::size_t{slot} * stride_; }

    void check_in_use(const char* operation, std::uint32_t slot) const {
        if (!in_use(slot)) {
            throw invalid_argument(std::string("state_slots::") + operation + ": slot " + std::to_string(slot) +
                                   " is not in use (never acquired, or released)");
        }
    }

    /// The lowest free slot. Throws: out_of_blocks (none).
    [[nodiscard]] std::uint32_t lowest_free() const {
        if (!returned_.empty()) {
            return *returned_.begin();  // below every never-used slot
        }
        if (never_used_ == max_slots_) {
            throw out_of_blocks(1, 0, max_slots_);
        }
        return never_used_;
    }
    /// Marks lowest_free()'s slot used.
    void take(std::uint32_t slot) noexcept {
        in_use_[slot] = 1;
        ++used_;
        if (!returned_.empty() && *returned_.begin() == slot) {
            returned_.erase(returned_.begin());
        } else {
            ++never_used_;
        }
    }
    void give(std::uint32_t slot) {
        returned_.insert(slot);  // may throw: nothing changed
        in_use_[slot] = 0;
        --used_;
    }
    void release_noexcept(std::uint32_t slot, cudaStream_t stream) noexcept {
        try {
            release(slot, stream);
        } catch (...) {
            // only a failed give-back: the pool retired that memory, the slot is free
        }
    }

    std::size_t slot_bytes_;
    std::size_t stride_;
    std::uint32_t max_slots_;
    kv_cache_options options_;
    pool_type pool_;
    block_fences fences_;                  // per slot: the streams that may still read it
    std::vector<std::uint8_t> in_use_ = std::vector<std::uint8_t>(max_slots_, 0);
    std::size_t used_ = 0;                 // slots in use
    std::set<std::uint32_t> returned_;     // free slots below never_used_
    std::uint32_t never_used_ = 0;         // slots from here up were never used
    detail::device_copy<backing_type> copy_;
};

}  // namespace vmmpp
