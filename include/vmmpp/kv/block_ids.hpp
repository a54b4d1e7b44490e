// vmmpp/kv/block_ids.hpp: the block-id policy a layout names (Layout::block_ids; block_ids_of in
// vmmpp/kv/layout.hpp): which id a sequence's next block gets, and the reference counts that say
// which blocks are live. kv_cache asks it and never knows which policy it has. Two models:
// block_allocator (lowest free id, any sequence; vmmpp/kv/block_allocator.hpp) and
// slot_block_allocator (each sequence its own slot of consecutive ids; vmmpp/kv/sequence_slots.hpp).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "vmmpp/kv/geometry.hpp"

namespace vmmpp {

/// What kv_cache needs of a block-id policy (constructed from a validated geometry):
/// - `take_slot()`: a new sequence's slot (a policy without slots returns 0), or throws with
///   nothing changed; `give_slot(slot)`: a freed sequence's slot back, its blocks already free
///   (never throws);
/// - `allocate(slot, index)`: an id with one reference for block `index` of the sequence in
///   `slot` (out_of_blocks when none is free, nothing changed);
/// - `fits(tokens)`: whether one sequence may hold `tokens` tokens; `check_room(seq, tokens,
///   n_tokens, layout)`: throws invalid_argument (naming the layout) when a sequence of `tokens`
///   tokens may not grow by `n_tokens`; `check_fork(seq, layout)`: throws invalid_argument when
///   the policy cannot share blocks between sequences;
/// - reference counts: `retain(id)`, `release(id)` (true when the id is free again; never
///   throws for a live id), `refs(id)`; counts: `max_blocks()`, `used_blocks()`, `free_blocks()`.
template <class P>
concept kv_block_ids = std::constructible_from<P, const kv_geometry&> &&
                       requires(P& p, const P& cp, std::uint32_t slot, std::size_t n, std::int32_t id, std::uint64_t seq,
                                const char* layout) {
                           { p.take_slot() } -> std::same_as<std::uint32_t>;
                           { p.give_slot(slot) } noexcept;
                           { p.allocate(slot, n) } -> std::same_as<std::int32_t>;
                           { cp.fits(n) } -> std::same_as<bool>;
                           cp.check_room(seq, n, n, layout);
                           cp.check_fork(seq, layout);
                           p.retain(id);
                           { p.release(id) } -> std::same_as<bool>;
                           { cp.refs(id) } -> std::same_as<std::uint32_t>;
                           { cp.max_blocks() } -> std::same_as<std::size_t>;
                           { cp.used_blocks() } -> std::same_as<std::size_t>;
                           { cp.free_blocks() } -> std::same_as<std::size_t>;
                       };

} // namespace vmmpp
