// copy_blocks between host caches (CI runs these for real): bytes land where the block lists
// say, in every layout and across configurations; every refused call leaves the destination's
// bytes and bookkeeping as they were.
#define BOOST_TEST_MODULE kv transfer
#include "support/cpu_main.hpp"

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/driver/device.hpp"
#include "vmmpp/kv/transfer.hpp"

using namespace vmmpp_test;
using vmmpp::kv_part;

namespace {

// Every paged layout of vmmpp::kv_layouts (a sequence_contiguous block id names a slot position).
using layouts = vmmpp::apply_t<vmmpp::paged_kv_layouts, std::tuple>;

// 2 layers, 2 heads, 64 dims, fp16, 16 tokens: a block tensor is 4 KiB, a block 16 KiB.
constexpr vmmpp::kv_geometry small{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 512};

std::uint8_t pattern_byte(unsigned tag, std::int32_t block, std::size_t piece, std::size_t i) {
    return static_cast<std::uint8_t>(tag * 31u + static_cast<unsigned>(block) * 7u + piece * 13u + i * 3u + i / 251u);
}

/// Writes a pattern (depending on the tag, the block, the piece and the byte) into every
/// contiguous piece of `block` (every layer's K and V, packed K/V or latent) the layout names.
template <class Cache>
void fill_block(Cache& c, std::int32_t block, unsigned tag) {
    std::size_t piece = 0;
    Cache::layout_type::for_each_piece(c.geometry(), static_cast<std::uint32_t>(block),
                                       [&](std::size_t off, std::size_t bytes) {
                                           std::byte* p = c.pool().base() + off;
                                           for (std::size_t i = 0; i < bytes; ++i) {
                                               p[i] = static_cast<std::byte>(pattern_byte(tag, block, piece, i));
                                           }
                                           ++piece;
                                       });
}

/// Every byte of `block`, piece by piece.
template <class Cache>
std::vector<std::byte> block_bytes(const Cache& c, std::int32_t block) {
    std::vector<std::byte> out;
    Cache::layout_type::for_each_piece(c.geometry(), static_cast<std::uint32_t>(block),
                                       [&](std::size_t off, std::size_t bytes) {
                                           const std::byte* p = c.pool().base() + off;
                                           out.insert(out.end(), p, p + bytes);
                                       });
    // every part of every layer, through address(), lies in those bytes: K of the last layer
    const auto& g = c.geometry();
    const std::byte* last = c.address(g.layers - 1, kv_part::key, block);
    bool inside = false;
    Cache::layout_type::for_each_piece(g, static_cast<std::uint32_t>(block), [&](std::size_t off, std::size_t bytes) {
        inside = inside || (last >= c.pool().base() + off && last < c.pool().base() + off + bytes);
    });
    BOOST_TEST(inside);
    return out;
}

/// What "unchanged" means for a cache: its bookkeeping and the bytes of every live block.
template <class Cache>
struct snapshot {
    std::size_t used, committed, seqs;
    std::map<std::int32_t, std::vector<std::byte>> blocks;
    explicit snapshot(const Cache& c)
        : used(c.used_blocks()), committed(c.pool().committed_bytes()), seqs(c.sequence_count()) {
        for (std::int32_t b = 0; b < static_cast<std::int32_t>(c.geometry().max_blocks); ++b) {
            if (c.block_refs(b) > 0) {
                blocks[b] = block_bytes(c, b);
            }
        }
    }
    bool operator==(const snapshot&) const = default;
};

/// A sequence of `n_blocks` full blocks whose blocks are filled with the tag's pattern.
template <class Cache>
vmmpp::seq_id filled_sequence(Cache& c, std::size_t n_blocks, unsigned tag) {
    const auto s = c.add_sequence();
    c.append(s, n_blocks * c.geometry().block_tokens);
    for (std::int32_t b : c.block_table(s)) {
        fill_block(c, b, tag);
    }
    return s;
}

/// The message of the invalid_argument `f` throws (a test failure if it throws nothing else).
std::string invalid_argument_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const vmmpp::invalid_argument& e) {
        return e.what();
    }
    BOOST_ERROR("no vmmpp::invalid_argument thrown");
    return {};
}

bool mentions(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(copies_blocks_between_host_caches, Layout, layouts) {
    kv_factory<kv_case<vmmpp::host_config, Layout>> fs, fd;
    auto src = fs.make(small);
    auto dst = fd.make(small);
    filled_sequence(*src, 6, 1);  // blocks 0..5
    filled_sequence(*dst, 7, 2);  // blocks 0..6
    const snapshot<typename decltype(src)::element_type> src_before(*src);
    const snapshot<typename decltype(dst)::element_type> dst_before(*dst);

    // A run (0,1,2 -> 1,2,3: copied as one piece per K/V), a lone pair, and a backwards one.
    const std::vector<std::int32_t> from{0, 1, 2, 5, 3};
    const std::vector<std::int32_t> to{1, 2, 3, 6, 0};
    vmmpp::copy_blocks(*src, from, *dst, to, nullptr);

    for (std::size_t i = 0; i < from.size(); ++i) {
        BOOST_TEST((block_bytes(*dst, to[i]) == block_bytes(*src, from[i])), "dst block " << to[i] << " != src block " << from[i]);
    }
    for (std::int32_t untouched : {4, 5}) {
        BOOST_TEST((block_bytes(*dst, untouched) == dst_before.blocks.at(untouched)), "dst block " << untouched);
    }
    BOOST_TEST((snapshot<typename decltype(src)::element_type>(*src) == src_before));  // the source is only read
    BOOST_TEST(dst->used_blocks() == dst_before.used);
    BOOST_TEST(dst->pool().committed_bytes() == dst_before.committed);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(copies_between_configurations_and_sizes, Layout, layouts) {
    // Host source; a chunked, budgeted destination with fewer blocks (other region pitches in
    // layer_major), and one over borrowed memory.
    kv_factory<kv_case<vmmpp::host_config, Layout>> fs;
    kv_factory<kv_case<host_chunked_budget_config, Layout>> fd;
    kv_factory<kv_case<host_external_config, Layout>> fe;
    auto src = fs.make(small);
    auto smaller = small;
    smaller.max_blocks = 64;
    auto dst = fd.make(smaller);
    auto ext = fe.make(small);
    filled_sequence(*src, 4, 3);
    filled_sequence(*dst, 4, 4);
    filled_sequence(*ext, 4, 5);

    const std::vector<std::int32_t> from{0, 1, 2, 3};
    const std::vector<std::int32_t> to{3, 0, 1, 2};
    vmmpp::copy_blocks(*src, from, *dst, to);
    vmmpp::copy_blocks(*dst, std::vector<std::int32_t>{0, 1}, *ext, std::vector<std::int32_t>{2, 3});
    for (std::size_t i = 0; i < from.size(); ++i) {
        BOOST_TEST((block_bytes(*dst, to[i]) == block_bytes(*src, from[i])));
    }
    BOOST_TEST((block_bytes(*ext, 2) == block_bytes(*src, 1)));
    BOOST_TEST((block_bytes(*ext, 3) == block_bytes(*src, 2)));
    BOOST_TEST((block_bytes(*ext, 0) != block_bytes(*src, 0)));  // untouched: still tag 5
}

BOOST_AUTO_TEST_CASE_TEMPLATE(copies_within_one_cache, Layout, layouts) {
    kv_factory<kv_case<vmmpp::host_config, Layout>> f;
    auto c = f.make(small);
    filled_sequence(*c, 3, 6);  // 0, 1, 2
    filled_sequence(*c, 3, 7);  // 3, 4, 5
    const auto b0 = block_bytes(*c, 0);
    const auto b1 = block_bytes(*c, 1);
    vmmpp::copy_blocks(*c, std::vector<std::int32_t>{0, 1}, *c, std::vector<std::int32_t>{4, 5});
    BOOST_TEST((block_bytes(*c, 4) == b0));
    BOOST_TEST((block_bytes(*c, 5) == b1));
    BOOST_TEST((block_bytes(*c, 0) == b0));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(empty_lists_copy_nothing, Layout, layouts) {
    kv_factory<kv_case<vmmpp::host_config, Layout>> fs, fd;
    auto src = fs.make(small);
    auto dst = fd.make(small);
    filled_sequence(*dst, 2, 8);
    const snapshot<typename decltype(dst)::element_type> before(*dst);
    vmmpp::copy_blocks(*src, std::span<const std::int32_t>{}, *dst, std::span<const std::int32_t>{});
    BOOST_TEST((snapshot<typename decltype(dst)::element_type>(*dst) == before));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(refused_copies_leave_the_destination_unchanged, Layout, layouts) {
    kv_factory<kv_case<vmmpp::host_config, Layout>> fs, fd;
    auto src = fs.make(small);
    auto dst = fd.make(small);
    filled_sequence(*src, 4, 9);                    // 0..3 live
    const auto gone = filled_sequence(*src, 1, 9);  // block 4, freed below: dead again
    src->free(gone);
    filled_sequence(*dst, 4, 10);                   // 0..3 live, 4.. free
    using dst_cache = typename decltype(dst)::element_type;
    const snapshot<dst_cache> before(*dst);
    auto unchanged = [&] { return snapshot<dst_cache>(*dst) == before; };
    using ids = std::vector<std::int32_t>;

    // Every case but the last entry is valid, so a copy issued before checking would show.
    std::string m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 2}, *dst, ids{1, 2}); });
    BOOST_TEST(mentions(m, "3 source blocks but 2 destination blocks"), m);
    BOOST_TEST(unchanged());

    m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 4}, *dst, ids{1, 2, 3}); });
    BOOST_TEST(mentions(m, "source block 4 (entry 2) is free"), m);
    BOOST_TEST(unchanged());

    m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 2}, *dst, ids{1, 2, 7}); });
    BOOST_TEST(mentions(m, "destination block 7 (entry 2) is free"), m);
    BOOST_TEST(unchanged());

    m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 512}, *dst, ids{1, 2, 3}); });
    BOOST_TEST(mentions(m, "source block 512 (entry 2) is outside the source cache's 512 blocks"), m);
    BOOST_TEST(unchanged());

    m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 2}, *dst, ids{1, 2, -1}); });
    BOOST_TEST(mentions(m, "destination block -1 (entry 2) is outside"), m);
    BOOST_TEST(unchanged());

    m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 2}, *dst, ids{1, 2, 1}); });
    BOOST_TEST(mentions(m, "destination block 1 is listed twice"), m);
    BOOST_TEST(unchanged());

    // Within one cache, a block both read and written.
    m = invalid_argument_of([&] { vmmpp::copy_blocks(*dst, ids{0, 1}, *dst, ids{2, 1}); });
    BOOST_TEST(mentions(m, "block 1 is both a source and a destination"), m);
    BOOST_TEST(unchanged());

    // Another block shape: every differing field is named, max_blocks does not count.
    auto other = small;
    other.head_dim = 32;
    other.type = vmmpp::dtype::bf16;
    other.max_blocks = 64;
    kv_factory<kv_case<vmmpp::host_config, Layout>> fo;
    auto odd = fo.make(other);
    filled_sequence(*odd, 4, 11);
    m = invalid_argument_of([&] { vmmpp::copy_blocks(*odd, ids{0}, *dst, ids{1}); });
    BOOST_TEST(mentions(m, "geometries differ"), m);
    BOOST_TEST(mentions(m, "head_dim " + std::to_string(odd->geometry().head_dim) + " (source) vs " +
                               std::to_string(dst->geometry().head_dim) + " (destination)"),
               m);
    BOOST_TEST(mentions(m, "type bf16 (source) vs f16 (destination)"), m);
    BOOST_TEST(!mentions(m, "max_blocks"), m);
    BOOST_TEST(unchanged());
}

/// Review 2, G6: a destination block shared by a fork was overwritten, changing the KV of the
/// sequence that shares it. It is refused, naming the block and its reference count.
BOOST_AUTO_TEST_CASE_TEMPLATE(shared_destination_blocks_are_refused, Layout, layouts) {
    kv_factory<kv_case<vmmpp::host_config, Layout>> fs, fd;
    auto src = fs.make(small);
    auto dst = fd.make(small);
    filled_sequence(*src, 4, 12);
    filled_sequence(*dst, 2, 13);                    // 0, 1: one reference each
    const auto forked = filled_sequence(*dst, 2, 14);  // 2, 3: shared with the fork below
    const auto fork = dst->fork(forked);
    BOOST_TEST_REQUIRE(dst->block_refs(2) == 2u);
    using dst_cache = typename decltype(dst)::element_type;
    const snapshot<dst_cache> before(*dst);
    using ids = std::vector<std::int32_t>;

    // The first two entries are valid, so a copy issued before checking would show.
    const std::string m = invalid_argument_of([&] { vmmpp::copy_blocks(*src, ids{0, 1, 2}, *dst, ids{0, 1, 3}); });
    BOOST_TEST(mentions(m, "destination block 3 (entry 2) has reference count 2"), m);
    BOOST_TEST((snapshot<dst_cache>(*dst) == before));

    // Once the fork is gone the block is the sequence's own and may be written.
    dst->free(fork);
    BOOST_TEST_REQUIRE(dst->block_refs(3) == 1u);
    vmmpp::copy_blocks(*src, ids{0, 1, 2}, *dst, ids{0, 1, 3});
    BOOST_TEST((block_bytes(*dst, 3) == block_bytes(*src, 2)));
}

BOOST_AUTO_TEST_CASE(can_access_peer_checks_its_devices) {
    const int count = vmmpp::driver::device_count();
    if (count == 0) {
        // No driver: cuda_unavailable; a driver without devices: invalid_argument. Never true.
        BOOST_CHECK_THROW((void)vmmpp::can_access_peer(0, 1), vmmpp::error);
    } else {
        BOOST_TEST(vmmpp::can_access_peer(0, 0));
        BOOST_CHECK_THROW((void)vmmpp::can_access_peer(0, count), vmmpp::invalid_argument);
        BOOST_CHECK_THROW((void)vmmpp::can_access_peer(-1, 0), vmmpp::invalid_argument);
    }
}
