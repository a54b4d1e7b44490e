// vmmpp/kv/blocks_contiguous.hpp: a layout adaptor that keeps layout L's blocks whole. The
// pieces of a block (L::copy_shape: in layer_major, each layer's K and V) lie one after another,
// in L's order, and blocks one after another: block b is one range of rows x width bytes at
// b x that. Inside a piece, L's order stays (tokens, heads, dim), so a block copies between L and
// blocks_contiguous<L> piece by piece (copy_blocks takes the pair) and a kernel reads either
// with L's per-layer strides but the block stride.
//
// What it is for: memory that is copied a block at a time rather than read by attention
// kernels, such as the host tier's page-locked blocks (tier/host_tier.hpp). One block in one
// range is one DMA of a whole block instead of 2 x layers small ones (kv/detail/staged_copy.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "vmmpp/kv/block_allocator.hpp"
#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/kv/layout.hpp"

namespace vmmpp {

/// Layout L with each block's pieces adjacent and blocks adjacent (see the file comment). For
/// block_major (one piece per block) it is block_major's memory again.
template <kv_layout L>
struct blocks_contiguous {
    using base_layout = L;
    static constexpr const char* name = "blocks_contiguous";
    static constexpr unsigned parts = L::parts;
    static constexpr bool packs_kv = L::packs_kv;
    using block_ids = block_allocator;  ///< lowest free id (no sequence slots: blocks are copied, not read in runs)
    using block_copy_shape = kv_block_copy_shape;

    static void validate(const kv_geometry& g) { L::validate(g); }
    /// Bytes of one block: L's pieces, adjacent.
    [[nodiscard]] static constexpr std::size_t block_bytes(const kv_geometry& g) noexcept {
        const kv_block_copy_shape s = L::copy_shape(g);
        return s.rows * s.width;
    }
    [[nodiscard]] static constexpr std::size_t span_bytes(const kv_geometry& g) noexcept {
        return block_bytes(g) * g.max_blocks;
    }
    /// Where L puts (layer, part) of a block, counted from the block's first piece, is row r of
    /// the block plus an offset inside it (packed_kv's V: head_dim elements into the piece);
    /// here row r starts r x width into the block.
    [[nodiscard]] static constexpr std::size_t offset(const kv_geometry& g, std::uint32_t layer, kv_part part,
                                                      std::uint32_t block) noexcept {
        const kv_block_copy_shape s = L::copy_shape(g);
        const std::size_t in_block = L::offset(g, layer, part, 0) - L::offset(g, 0, kv_part::key, 0);
        return std::size_t{block} * block_bytes(g) + in_block / s.pitch * s.width + in_block % s.pitch;
    }
    [[nodiscard]] static constexpr std::size_t block_stride_bytes(const kv_geometry& g) noexcept {
        return block_bytes(g);
    }
    /// L's strides inside a block; the block stride is a whole block.
    [[nodiscard]] static constexpr kv_strides strides(const kv_geometry& g) noexcept {
        kv_strides s = L::strides(g);
        s[0] = static_cast<std::int64_t>(block_bytes(g) / size_of(g.type));
        return s;
    }
    template <class F>
    static void for_each_piece(const kv_geometry& g, std::uint32_t block, F&& f) {
        f(std::size_t{block} * block_bytes(g), block_bytes(g));
    }
    /// L's rows and width, the rows adjacent.
    [[nodiscard]] static constexpr kv_block_copy_shape copy_shape(const kv_geometry& g) noexcept {
        const kv_block_copy_shape s = L::copy_shape(g);
        return {s.rows, s.width, s.width};
    }
};

static_assert(kv_layout<blocks_contiguous<layer_major>>);
static_assert(kv_layout<blocks_contiguous<packed_kv>>);
static_assert(kv_layout<blocks_contiguous<mla>>);

/// Whether copy_blocks may copy between layouts A and B: the same layout, or one of them
/// blocks_contiguous over the other (their blocks have the same pieces).
template <class A, class B>
inline constexpr bool copyable_layouts = std::is_same_v<A, B> || std::is_same_v<A, blocks_contiguous<B>> ||
                                         std::is_same_v<blocks_contiguous<A>, B>;

} // namespace vmmpp
