// vmmpp/kv/block_allocator.hpp: block ids with reference counts, the block-id policy of the
// paged layouts (vmmpp/kv/block_ids.hpp). Allocation takes the lowest free id, so live blocks
// stay packed at the bottom of the span and the top pages can go back.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/block_ids.hpp"
#include "vmmpp/kv/geometry.hpp"

namespace vmmpp {

namespace detail {

/// Reference counts of block ids [0, size): what block_allocator and slot_block_allocator share.
/// Which free id comes next is theirs to say.
class block_refs {
public:
    explicit block_refs(std::uint32_t max_blocks) : refs_(max_blocks, 0) {}

    [[nodiscard]] std::size_t size() const noexcept { return refs_.size(); }
    [[nodiscard]] std::size_t used() const noexcept { return used_; }
    [[nodiscard]] bool is_free(std::size_t id) const noexcept { return refs_[id] == 0; }

    /// Free id `id` (in range) gets its first reference.
    void take(std::size_t id) noexcept {
        refs_[id] = 1;
        ++used_;
    }
    /// One more reference to a live block.
    void retain(std::int32_t id) {
        check_live(id);
        ++refs_[static_cast<std::size_t>(id)];
    }
    /// One reference less; true when that was the last and the id is free again. Throws only
    /// for an id that is not live (and then changes nothing).
    bool release(std::int32_t id) {
        check_live(id);
        if (--refs_[static_cast<std::size_t>(id)] > 0) {
            return false;
        }
        --used_;
        return true;
    }
    /// References to `id` (0 when free).
    [[nodiscard]] std::uint32_t refs(std::int32_t id) const {
        check_id(id);
        return refs_[static_cast<std::size_t>(id)];
    }

private:
    void check_id(std::int32_t id) const {
        if (id < 0 || static_cast<std::size_t>(id) >= refs_.size()) {
            throw invalid_argument("block id " + std::to_string(id) + " out of range [0, " +
                                   std::to_string(refs_.size()) + ")");
        }
    }
    void check_live(std::int32_t id) const {
        check_id(id);
        if (refs_[static_cast<std::size_t>(id)] == 0) {
            throw invalid_argument("block " + std::to_string(id) + " is free (double free?)");
        }
    }

    std::vector<std::uint32_t> refs_;
    std::size_t used_ = 0;
};

} // namespace detail

/// Reference-counted block ids in [0, max_blocks), lowest free first, for any sequence: no
/// slots, no limit per sequence, blocks shared by fork.
class block_allocator {
public:
    /// Room for every id's free-list entry is taken here, so release never allocates (and so
    /// never throws for a live id): free and truncate cannot stop half way.
    explicit block_allocator(std::uint32_t max_blocks) : refs_(max_blocks) { freed_.reserve(max_blocks); }
    explicit block_allocator(const kv_geometry& g) : block_allocator(g.max_blocks) {}

    [[nodiscard]] std::size_t max_blocks() const noexcept { return refs_.size(); }
    [[nodiscard]] std::size_t used_blocks() const noexcept { return refs_.used(); }
    [[nodiscard]] std::size_t free_blocks() const noexcept { return refs_.size() - refs_.used(); }

    /// The lowest free id, with one reference. out_of_blocks when none is free.
    [[nodiscard]] std::int32_t allocate() {
        if (free_blocks() == 0) {
            throw out_of_blocks(1, 0, refs_.size());
        }
        std::int32_t id;
        if (!freed_.empty()) {
            std::pop_heap(freed_.begin(), freed_.end(), std::greater<>{});  // the lowest freed id;
            id = freed_.back();                                             // every one lies below next_unused_
            freed_.pop_back();
        } else {
            id = next_unused_++;
        }
        refs_.take(static_cast<std::size_t>(id));
        return id;
    }

    /// As a kv_block_ids policy: any sequence takes the lowest free id.
    [[nodiscard]] std::int32_t allocate(std::uint32_t /*slot*/, std::size_t /*index*/) { return allocate(); }
    [[nodiscard]] std::uint32_t take_slot() noexcept { return 0; }
    void give_slot(std::uint32_t /*slot*/) noexcept {}
    [[nodiscard]] bool fits(std::size_t /*tokens*/) const noexcept { return true; }
    void check_room(std::uint64_t, std::size_t, std::size_t, const char*) const noexcept {}
    void check_fork(std::uint64_t, const char*) const noexcept {}

    /// One more reference to a live block.
    void retain(std::int32_t id) { refs_.retain(id); }

    /// One reference less; returns true when that was the last and the id is free again.
    /// Throws only for an id that is not live (and then changes nothing).
    bool release(std::int32_t id) {
        if (!refs_.release(id)) {
            return false;
        }
        freed_.push_back(id);  // within the capacity reserved up front: no allocation
        std::push_heap(freed_.begin(), freed_.end(), std::greater<>{});
        return true;
    }

    /// References to `id` (0 when free).
    [[nodiscard]] std::uint32_t refs(std::int32_t id) const { return refs_.refs(id); }

private:
    detail::block_refs refs_;
    std::vector<std::int32_t> freed_;  // a min-heap of freed ids, with room for all of them
    std::int32_t next_unused_ = 0;
};
static_assert(kv_block_ids<block_allocator>, "vmmpp::block_allocator does not model vmmpp::kv_block_ids");

} // namespace vmmpp
