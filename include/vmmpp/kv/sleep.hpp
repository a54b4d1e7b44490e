// vmmpp/kv/sleep.hpp: a kv_cache's sleep and wake (kv_cache::sleep, kv_cache::wake): an idle
// model's cache copies its live blocks to a host buffer and gives back all of its device memory,
// keeping its address reservation and every sequence; waking commits the same offsets again and
// copies the blocks back, so block ids, block tables, addresses and tensor descriptors stay
// valid. The types, and detail::cache_sleep, the part of the cache that does it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp {

/// A call that needs the cache's memory was made while the cache sleeps (append, truncate, free,
/// sleep), or one of its blocks was asked to move. The cache is unchanged; wake() it first.
class cache_asleep : public error {
public:
    explicit cache_asleep(const std::string& operation)
        : error("vmmpp::kv_cache::" + operation + " while the cache sleeps: wake() it first"), operation_(operation) {}
    /// The refused operation ("append", "free", ...).
    [[nodiscard]] const std::string& operation() const noexcept { return operation_; }

private:
    std::string operation_;
};

/// What kv_cache::sleep or kv_cache::wake did.
struct sleep_result {
    std::size_t bytes_copied = 0;  ///< live block bytes copied (to the host on sleep, back on wake)
    std::size_t ranges = 0;        ///< contiguous ranges they formed (one copy call each)
    std::size_t blocks = 0;        ///< live blocks
    /// sleep: bytes of device memory the pool gave back (its committed bytes before, less after).
    /// wake: bytes it committed.
    std::size_t pool_bytes = 0;
};

namespace detail {

/// The sleep and wake of a kv_cache `Cache` (whose friend it is): the cache's member, given the
/// cache on each call. It holds what a sleeping cache keeps: the host buffer, the live blocks
/// and their pieces merged into ranges, in offset order.
template <class Cache>
class cache_sleep {
public:
    [[nodiscard]] bool asleep() const noexcept { return state_.asleep; }

    /// Throws cache_asleep for `operation` while the cache sleeps.
    void refuse(const char* operation) const {
        if (state_.asleep) {
            throw cache_asleep(operation);
        }
    }

    /// Bytes sleep() would copy now (kv_cache::sleep_bytes).
    [[nodiscard]] std::size_t bytes(const Cache& c) const { return total(c.memory_.merged_pieces(live_blocks(c))); }

    /// kv_cache::sleep: copies, waits, then lets go of every block's memory and trims the pool.
    sleep_result sleep(Cache& c, std::span<std::byte> host, cudaStream_t stream) {
        refuse("sleep");
        state next;
        next.blocks = live_blocks(c);
        next.ranges = c.memory_.merged_pieces(next.blocks);
        const std::size_t bytes = total(next.ranges);
        if (host.size() < bytes) {
            throw invalid_argument("kv_cache::sleep: the host buffer holds " + std::to_string(host.size()) +
                                   " bytes; the " + std::to_string(next.blocks.size()) + " live blocks need " +
                                   std::to_string(bytes));
        }
        next.asleep = true;
        next.host = host.data();
        c.memory_.wait_for_device(c.options_.stream);  // the cache's own copies write into live blocks
        sleep_result result{bytes, next.ranges.size(), next.blocks.size(), 0};
        try {
            copy_ranges(c, next, /*to_host=*/true, stream);
            c.memory_.wait_for_device(stream);
        } catch (...) {
            c.memory_.wait_for_device_noexcept(stream);  // copies queued before the failure still read the blocks
            throw;
        }
        // Commit point: the data is in `host`; from here on the cache sleeps, whatever fails.
        const std::size_t before = c.pool_.committed_bytes();
        state_ = std::move(next);
        std::exception_ptr first = c.memory_.unhold(state_.blocks, pool_fence{});  // every fence waited for above
        try {
            (void)c.pool_.trim();
        } catch (...) {
            first = first ? first : std::current_exception();
        }
        const std::size_t after = c.pool_.committed_bytes();
        result.pool_bytes = before > after ? before - after : 0;
        if (first) {
            std::rethrow_exception(first);
        }
        return result;
    }

    /// kv_cache::wake: holds every live block again, copies the blocks back and waits.
    sleep_result wake(Cache& c, cudaStream_t stream) {
        if (!state_.asleep) {
            return {};
        }
        const std::size_t before = c.pool_.committed_bytes();
        bool held = false;
        try {
            c.memory_.hold(state_.blocks);
            held = true;
            copy_ranges(c, state_, /*to_host=*/false, stream);
            c.memory_.wait_for_device(stream);
        } catch (...) {
            c.memory_.wait_for_device_noexcept(stream);  // copies queued before the failure still write the blocks
            if (held) {
                c.memory_.unhold_noexcept(state_.blocks, pool_fence{});
            }
            try {
                (void)c.pool_.trim();
            } catch (...) {
                // what stays committed is counted in the pool's statistics
            }
            throw;
        }
        sleep_result result{total(state_.ranges), state_.ranges.size(), state_.blocks.size(), 0};
        const std::size_t after = c.pool_.committed_bytes();
        result.pool_bytes = after > before ? after - before : 0;
        state_ = state{};
        return result;
    }

private:
    struct state {
        bool asleep = false;
        std::byte* host = nullptr;
        std::vector<std::int32_t> blocks;
        std::vector<byte_range> ranges;
    };

    static std::size_t total(const std::vector<byte_range>& ranges) noexcept {
        std::size_t bytes = 0;
        for (const byte_range& r : ranges) {
            bytes += r.bytes;
        }
        return bytes;
    }
    /// Every live block, ascending: those sequences reference and those other holders keep
    /// (kv_cache::retain_block: a prefix cache's cached blocks, whose bytes must survive the sleep
    /// and whose memory must go back with the rest).
    static std::vector<std::int32_t> live_blocks(const Cache& c) {
        std::vector<std::int32_t> blocks;
        blocks.reserve(c.used_blocks());
        const auto n = static_cast<std::int32_t>(c.geometry().max_blocks);
        for (std::int32_t id = 0; id < n && blocks.size() < c.used_blocks(); ++id) {
            if (c.block_refs(id) != 0) {
                blocks.push_back(id);
            }
        }
        return blocks;
    }
    /// Copies `st`'s ranges between the pool and its host buffer, back to back in offset order
    /// (one copy per range; a range may span several physical allocations).
    static void copy_ranges(Cache& c, const state& st, bool to_host, cudaStream_t stream) {
        c.copy_.copy(stream, to_host ? "cuMemcpyAsync(kv_cache::sleep)" : "cuMemcpyAsync(kv_cache::wake)",
                     [&](auto&& copy) {
                         std::byte* host = st.host;
                         for (const byte_range& r : st.ranges) {
                             std::byte* dev = c.pool_.base() + r.offset;
                             copy(to_host ? host : dev, to_host ? dev : host, r.bytes);
                             host += r.bytes;
                         }
                     });
    }
    state state_;
};

} // namespace detail

} // namespace vmmpp
