// vmmpp/tier/host_store.hpp: the host tier's books (vmmpp/tier/host_tier.hpp): which host block
// holds which prefix key, in LRU order, and which hold swapped-out sequences. Only ids and keys:
// the bytes live in the tier's host kv_cache, and every copy is the tier's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/prefix/block_hash.hpp"
#include "vmmpp/prefix/eviction.hpp"

namespace vmmpp {

/// A host tier had no room: `needed` host blocks, `free` free or evictable, of `max_blocks`
/// (blocks of swapped-out sequences are neither). Nothing changed.
class tier_full : public error {
public:
    tier_full(const std::string& operation, std::size_t needed, std::size_t free, std::size_t max_blocks)
        : error("vmmpp::host_tier::" + operation + ": " + std::to_string(needed) + " host blocks needed, " +
                std::to_string(free) + " free or evictable of " + std::to_string(max_blocks) +
                " (the rest hold swapped-out sequences)"),
          needed_(needed), free_(free), max_blocks_(max_blocks) {}
    [[nodiscard]] std::size_t needed() const noexcept { return needed_; }
    [[nodiscard]] std::size_t free() const noexcept { return free_; }
    [[nodiscard]] std::size_t max_blocks() const noexcept { return max_blocks_; }

private:
    std::size_t needed_, free_, max_blocks_;
};

namespace detail {

/// The keyed host blocks (a prefix's blocks, evictable in LRU order unless pinned for a load in
/// progress) and the swapped ones (a sequence's, kept until swapped in or dropped).
class host_store {
public:
    [[nodiscard]] std::optional<std::int32_t> block_of(const block_key& key) const {
        const auto it = by_key_.find(key);
        return it == by_key_.end() ? std::nullopt : std::optional<std::int32_t>(it->second);
    }
    [[nodiscard]] bool contains(const block_key& key) const { return by_key_.contains(key); }
    [[nodiscard]] bool contains_block(std::int32_t b) const { return key_of_.contains(b); }
    [[nodiscard]] std::size_t keyed_blocks() const noexcept { return by_key_.size(); }

    /// Records host block `b` as holding `key`, the newest. Strong.
    void add(const block_key& key, std::int32_t b) {
        by_key_.emplace(key, b);
        try {
            key_of_.emplace(b, key);
            try {
                order_.insert(b);
            } catch (...) {
                key_of_.erase(b);
                throw;
            }
        } catch (...) {
            by_key_.erase(key);
            throw;
        }
    }
    void touch(std::int32_t b) noexcept { order_.touch(b); }
    /// Forgets keyed block `b` (the caller releases it).
    void remove(std::int32_t b) noexcept {
        if (const auto it = key_of_.find(b); it != key_of_.end()) {
            by_key_.erase(it->second);
            key_of_.erase(it);
            order_.erase(b);
        }
    }

    /// Up to `n` keyed blocks to evict, oldest first, skipping the pinned ones.
    [[nodiscard]] std::vector<std::int32_t> oldest(std::size_t n) const {
        std::vector<std::int32_t> out;
        order_.for_each_oldest([&](std::int32_t b) {
            if (out.size() < n && !pinned_.contains(b)) {
                out.push_back(b);
            }
            return out.size() < n;
        });
        return out;
    }
    [[nodiscard]] std::size_t evictable_blocks() const noexcept { return by_key_.size() - pinned_.size(); }

    /// Pins keyed blocks about to be loaded, so that evictions during the load (the GPU side
    /// spilling into this tier) leave them; unpin_all when the copies are queued.
    void pin(std::span<const std::int32_t> blocks) { pinned_.insert(blocks.begin(), blocks.end()); }
    void unpin_all() noexcept { pinned_.clear(); }

    /// Swap slots: a sequence's host blocks and token count under a new id.
    struct swapped {
        std::vector<std::int32_t> blocks;
        std::size_t tokens = 0;
    };
    std::uint64_t add_swapped(swapped s) {
        const std::uint64_t id = next_swap_++;
        swapped_blocks_ += s.blocks.size();
        swaps_.emplace(id, std::move(s));
        return id;
    }
    [[nodiscard]] const swapped& swap(std::uint64_t id) const {
        const auto it = swaps_.find(id);
        if (it == swaps_.end()) {
            throw invalid_argument("vmmpp::host_tier: no swapped-out sequence " + std::to_string(id));
        }
        return it->second;
    }
    void remove_swapped(std::uint64_t id) noexcept {
        if (const auto it = swaps_.find(id); it != swaps_.end()) {
            swapped_blocks_ -= it->second.blocks.size();
            swaps_.erase(it);
        }
    }
    [[nodiscard]] std::size_t swapped_sequences() const noexcept { return swaps_.size(); }
    [[nodiscard]] std::size_t swapped_blocks() const noexcept { return swapped_blocks_; }
    template <class F>
    void for_each_swapped(F&& f) const {
        for (const auto& [id, s] : swaps_) {
            f(id, s);
        }
    }

private:
    std::unordered_map<block_key, std::int32_t, block_key_hash> by_key_;
    std::unordered_map<std::int32_t, block_key> key_of_;
    lru_eviction order_;
    std::unordered_set<std::int32_t> pinned_;
    std::unordered_map<std::uint64_t, swapped> swaps_;
    std::uint64_t next_swap_ = 1;
    std::size_t swapped_blocks_ = 0;
};

} // namespace detail
} // namespace vmmpp
