// vmmpp/kv/sequence_slots.hpp: the block-id policy of sequence-slot layouts
// (sequence_contiguous, vmmpp/kv/layout.hpp; the policy's interface: vmmpp/kv/block_ids.hpp).
// Each live sequence owns one slot of `slot_blocks` consecutive block ids, [slot * slot_blocks,
// (slot + 1) * slot_blocks), and its i-th block is always id slot * slot_blocks + i, so its K
// (or V) of a layer is one contiguous run of memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/block_allocator.hpp"
#include "vmmpp/kv/block_ids.hpp"
#include "vmmpp/kv/geometry.hpp"

namespace vmmpp {

/// Every sequence slot of a sequence-slot layout is taken: `in_use` slots of `slots`, each
/// `slot_blocks` blocks (the geometry's max_tokens_per_sequence rounded up to whole blocks).
class out_of_sequence_slots : public error {
public:
    out_of_sequence_slots(std::size_t slots, std::size_t slot_blocks, std::size_t max_tokens_per_sequence)
        : error("out of sequence slots: all " + std::to_string(slots) + " are in use (max_blocks / " +
                std::to_string(slot_blocks) + " blocks per sequence, for max_tokens_per_sequence " +
                std::to_string(max_tokens_per_sequence) + "); free a sequence first"),
          slots_(slots), slot_blocks_(slot_blocks) {}
    /// Slots of the cache (all in use).
    [[nodiscard]] std::size_t slots() const noexcept { return slots_; }
    /// Blocks per slot.
    [[nodiscard]] std::size_t slot_blocks() const noexcept { return slot_blocks_; }

private:
    std::size_t slots_;
    std::size_t slot_blocks_;
};

/// Reference-counted block ids handed out by slot: lowest free slot first (so live sequences
/// pack at the bottom of each region and emptied pages sit at the top, as block_allocator's
/// lowest-first does), a given id within it. A sequence holds at most the geometry's
/// max_tokens_per_sequence tokens, and cannot share blocks with another (fork is refused).
class slot_block_allocator {
public:
    /// `max_blocks / slot_blocks` slots; blocks beyond the last whole slot are never handed out.
    slot_block_allocator(std::uint32_t max_blocks, std::uint32_t slot_blocks, std::size_t max_tokens_per_sequence)
        : refs_(max_blocks), slot_blocks_(slot_blocks), slots_(max_blocks / slot_blocks),
          max_tokens_(max_tokens_per_sequence) {}
    /// Slots of max_tokens_per_sequence tokens in whole blocks (the layout validated that one fits).
    explicit slot_block_allocator(const kv_geometry& g)
        : slot_block_allocator(g.max_blocks, slot_blocks_for(g), g.max_tokens_per_sequence) {}
    /// Blocks of one slot over `g`: max_tokens_per_sequence rounded up to whole blocks.
    [[nodiscard]] static constexpr std::uint32_t slot_blocks_for(const kv_geometry& g) noexcept {
        return static_cast<std::uint32_t>(g.blocks_for(g.max_tokens_per_sequence));
    }

    [[nodiscard]] std::size_t max_blocks() const noexcept { return refs_.size(); }
    [[nodiscard]] std::size_t used_blocks() const noexcept { return refs_.used(); }
    /// Blocks not in use (those of live sequences' slots that are not yet taken included).
    [[nodiscard]] std::size_t free_blocks() const noexcept { return refs_.size() - refs_.used(); }
    [[nodiscard]] std::uint32_t slot_blocks() const noexcept { return slot_blocks_; }
    [[nodiscard]] std::size_t slot_count() const noexcept { return slots_.max_blocks(); }
    [[nodiscard]] std::size_t free_slots() const noexcept { return slots_.free_blocks(); }

    /// The lowest free slot. Throws out_of_sequence_slots (naming the numbers) when none is
    /// free; then nothing changed.
    [[nodiscard]] std::uint32_t take_slot() {
        if (slots_.free_blocks() == 0) {
            throw out_of_sequence_slots(slots_.max_blocks(), slot_blocks_, max_tokens_);
        }
        return static_cast<std::uint32_t>(slots_.allocate());
    }
    /// Gives a taken slot back; its blocks must all be free already.
    void give_slot(std::uint32_t slot) noexcept { (void)slots_.release(static_cast<std::int32_t>(slot)); }

    /// Whether a sequence may hold `tokens` tokens: max_tokens_per_sequence at most.
    [[nodiscard]] bool fits(std::size_t tokens) const noexcept { return tokens <= max_tokens_; }
    /// Throws invalid_argument (nothing changed) when sequence `seq` of `tokens` tokens would
    /// outgrow its slot with `n_tokens` more.
    void check_room(std::uint64_t seq, std::size_t tokens, std::size_t n_tokens, const char* layout) const {
        if (n_tokens > max_tokens_ - tokens) {
            throw invalid_argument("append of " + std::to_string(n_tokens) + " tokens to sequence " +
                                   std::to_string(seq) + " (" + std::to_string(tokens) +
                                   " tokens): more than max_tokens_per_sequence " + std::to_string(max_tokens_) +
                                   " of the " + layout + " layout");
        }
    }
    /// Throws invalid_argument: a block id names a position in one slot, so two sequences cannot
    /// share blocks.
    void check_fork(std::uint64_t seq, const char* layout) const {
        throw invalid_argument("fork of sequence " + std::to_string(seq) + ": the " + layout +
                               " layout gives each sequence its own contiguous slot of block ids, so a fork "
                               "cannot share blocks; add a sequence and append (copy) instead");
    }

    /// Id `index` of slot `slot`, with one reference (it must be free: kv_cache asks only for a
    /// sequence's next index).
    [[nodiscard]] std::int32_t allocate(std::uint32_t slot, std::size_t index) {
        if (index >= slot_blocks_) {
            throw invalid_argument("block " + std::to_string(index) + " of a sequence slot of " +
                                   std::to_string(slot_blocks_) + " blocks");
        }
        const std::size_t id = std::size_t{slot} * slot_blocks_ + index;
        if (!refs_.is_free(id)) {
            throw invalid_argument("block " + std::to_string(id) + " of slot " + std::to_string(slot) +
                                   " is already in use");
        }
        refs_.take(id);
        return static_cast<std::int32_t>(id);
    }
    /// One more reference to a live block.
    void retain(std::int32_t id) { refs_.retain(id); }
    /// One reference less; true when that was the last. Throws only for an id that is not live.
    bool release(std::int32_t id) { return refs_.release(id); }
    /// References to `id` (0 when free).
    [[nodiscard]] std::uint32_t refs(std::int32_t id) const { return refs_.refs(id); }

private:
    detail::block_refs refs_;
    std::uint32_t slot_blocks_;
    block_allocator slots_;  // slot ids, lowest free first
    std::size_t max_tokens_;  // per sequence
};
static_assert(kv_block_ids<slot_block_allocator>, "vmmpp::slot_block_allocator does not model vmmpp::kv_block_ids");

} // namespace vmmpp
