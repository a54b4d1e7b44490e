// vmmpp/interop/nixl.hpp on host caches (CI runs these for real): the extents a transfer engine
// registers follow the pool as it commits and gives back; block pieces lie in one extent each;
// paired piece lists move the right bytes from one cache to another (a memcpy per pair stands in
// for the engine's READ).
#define BOOST_TEST_MODULE nixl regions
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/interop/nixl.hpp"

using namespace vmmpp_test;
using vmmpp::byte_range;
using vmmpp::committed_extent;

namespace {

// block_major: one 16 KiB piece per block, 128 blocks per 2 MiB page.
constexpr vmmpp::kv_geometry small{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 1024};
constexpr std::size_t block_bytes = 16 * 1024;

/// Pages committed one per extent (host_config) or in extents of several pages.
using host_extents_config = vmmpp::pool_config<vmmpp::host, vmmpp::adaptive_extents, vmmpp::unlimited>;
using configs = boost::mpl::list<vmmpp::host_config, host_extents_config>;
// Every paged layout of vmmpp::kv_layouts: pieces per layer, one piece per block, packed K|V, a latent.
using layouts = vmmpp::apply_t<vmmpp::paged_kv_layouts, std::tuple>;

std::size_t total(const std::vector<byte_range>& pieces) {
    std::size_t n = 0;
    for (const byte_range& p : pieces) {
        n += p.bytes;
    }
    return n;
}

/// Every piece lies inside one extent.
void check_inside_extents(const std::vector<byte_range>& pieces, const std::vector<committed_extent>& extents) {
    for (const byte_range& p : pieces) {
        bool inside = false;
        for (const committed_extent& e : extents) {
            inside = inside || (p.offset >= e.offset && p.offset + p.bytes <= e.offset + e.bytes);
        }
        BOOST_TEST(inside, "piece [" << p.offset << ", +" << p.bytes << ") crosses an extent boundary");
    }
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(extents_follow_commits_and_give_backs, Config, configs) {
    vmmpp::kv_cache<Config, vmmpp::block_major> cache(small);
    BOOST_TEST(cache.pool().committed_extents().empty());

    const vmmpp::seq_id a = cache.add_sequence();
    cache.append(a, 16 * 200);  // 200 blocks: two pages
    const std::vector<committed_extent> first = cache.pool().committed_extents();
    BOOST_REQUIRE(!first.empty());
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < first.size(); ++i) {
        bytes += first[i].bytes;
        BOOST_TEST(first[i].commit > 0u);
        if (i > 0) {
            BOOST_TEST(first[i].offset >= first[i - 1].offset + first[i - 1].bytes);
            BOOST_TEST(first[i].commit != first[i - 1].commit);
        }
    }
    BOOST_TEST(bytes == cache.pool().committed_bytes());

    cache.free(a);
    (void)cache.pool().trim();
    BOOST_TEST(cache.pool().committed_extents().empty());

    // Committed again at the same offsets: new commit numbers, so a tracker re-registers.
    const vmmpp::seq_id b = cache.add_sequence();
    cache.append(b, 16 * 200);
    const std::vector<committed_extent> again = cache.pool().committed_extents();
    BOOST_REQUIRE(!again.empty());
    BOOST_TEST(again.front().offset == first.front().offset);
    BOOST_TEST(again.front().commit > first.back().commit);
}

BOOST_AUTO_TEST_CASE(tracker_registers_what_came_and_deregisters_what_went) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major> cache(small);
    vmmpp::registration_tracker tracker;
    std::vector<committed_extent> registered;  // what the "engine" holds
    auto reg = [&](const committed_extent& e) { registered.push_back(e); };
    auto dereg = [&](const committed_extent& e) {
        auto it = std::find(registered.begin(), registered.end(), e);
        BOOST_REQUIRE(it != registered.end());
        registered.erase(it);
    };
    auto sorted = [](std::vector<committed_extent> v) {
        std::sort(v.begin(), v.end(), [](const auto& x, const auto& y) { return x.offset < y.offset; });
        return v;
    };

    const vmmpp::seq_id a = cache.add_sequence();
    cache.append(a, 16 * 300);  // three pages
    tracker.sync(cache.pool().committed_extents(), reg, dereg);
    BOOST_TEST(registered.size() == 3u);
    BOOST_TEST((sorted(registered) == cache.pool().committed_extents()));
    BOOST_TEST(tracker.changes(cache.pool().committed_extents()).empty());

    const vmmpp::seq_id b = cache.add_sequence();
    cache.append(b, 16 * 128);  // one more page
    const vmmpp::registration_change grow = tracker.changes(cache.pool().committed_extents());
    BOOST_TEST(grow.added.size() == 1u);
    BOOST_TEST(grow.removed.empty());
    tracker.sync(cache.pool().committed_extents(), reg, dereg);
    BOOST_TEST((sorted(registered) == cache.pool().committed_extents()));

    // a's pages go back, b's stay; then a page at a freed offset comes back as a new commit.
    cache.free(a);
    (void)cache.pool().trim();
    tracker.sync(cache.pool().committed_extents(), reg, dereg);
    BOOST_TEST(registered.size() == 2u);  // pages 0 and 1 went; b holds pages 2 and 3
    const vmmpp::seq_id c = cache.add_sequence();
    cache.append(c, 16);
    const vmmpp::registration_change back = tracker.changes(cache.pool().committed_extents());
    BOOST_TEST(back.added.size() == 1u);
    BOOST_TEST(back.removed.empty());
    tracker.sync(cache.pool().committed_extents(), reg, dereg);
    BOOST_TEST((sorted(registered) == cache.pool().committed_extents()));
    BOOST_TEST((tracker.registered() == cache.pool().committed_extents()));
}

BOOST_AUTO_TEST_CASE(tracker_keeps_what_a_failed_sync_did) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major> cache(small);
    vmmpp::registration_tracker tracker;
    const vmmpp::seq_id a = cache.add_sequence();
    cache.append(a, 16 * 300);  // three extents
    int calls = 0;
    auto failing = [&](const committed_extent&) {
        if (++calls == 2) {
            throw std::runtime_error("registration refused");
        }
    };
    BOOST_CHECK_THROW(tracker.sync(cache.pool().committed_extents(), failing, [](const committed_extent&) {}),
                      std::runtime_error);
    BOOST_TEST(tracker.registered().size() == 1u);  // the first one went through
    std::vector<committed_extent> retried;
    tracker.sync(cache.pool().committed_extents(), [&](const committed_extent& e) { retried.push_back(e); },
                 [](const committed_extent&) { BOOST_FAIL("nothing to deregister"); });
    BOOST_TEST(retried.size() == 2u);
    BOOST_TEST((tracker.registered() == cache.pool().committed_extents()));
}

BOOST_AUTO_TEST_CASE(pieces_are_cut_where_extents_end) {
    // Blocks 127 and 128 are adjacent in memory and merge into one piece, which a page boundary
    // crosses: cut with one extent per page, whole when one extent holds both pages.
    const std::vector<std::int32_t> blocks{127, 128};
    const std::vector<committed_extent> per_page{{0, 2u << 20, 1}, {2u << 20, 2u << 20, 2}};
    const std::vector<committed_extent> one{{0, 4u << 20, 7}};
    const auto cut = vmmpp::block_pieces<vmmpp::block_major>(small, blocks, per_page);
    BOOST_REQUIRE(cut.size() == 2u);
    BOOST_TEST(cut[0].offset == 127 * block_bytes);
    BOOST_TEST(cut[0].bytes == block_bytes);
    BOOST_TEST(cut[1].offset == 128 * block_bytes);
    const auto whole = vmmpp::block_pieces<vmmpp::block_major>(small, blocks, one);
    BOOST_REQUIRE(whole.size() == 1u);
    BOOST_TEST(whole[0].bytes == 2 * block_bytes);

    // List order is kept (pairing depends on it): 128 before 127 does not merge.
    const std::vector<std::int32_t> reversed{128, 127};
    const auto r = vmmpp::block_pieces<vmmpp::block_major>(small, reversed, one);
    BOOST_REQUIRE(r.size() == 2u);
    BOOST_TEST(r[0].offset == 128 * block_bytes);

    // Bytes outside every extent are refused, naming them.
    const std::vector<committed_extent> first_only{{0, 2u << 20, 1}};
    try {
        (void)vmmpp::block_pieces<vmmpp::block_major>(small, blocks, first_only);
        BOOST_FAIL("expected invalid_argument");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(std::string(e.what()).find(std::to_string(128 * block_bytes)) != std::string::npos, e.what());
    }
}

BOOST_AUTO_TEST_CASE(pairs_cut_at_both_sides_boundaries) {
    const std::vector<byte_range> local{{0, 100}, {1000, 50}};
    const std::vector<byte_range> remote{{500, 30}, {700, 120}};
    const std::vector<vmmpp::piece_pair> pairs = vmmpp::pair_pieces(local, remote);
    const std::vector<vmmpp::piece_pair> expected{{0, 500, 30}, {30, 700, 70}, {1000, 770, 50}};
    BOOST_TEST((pairs == expected));
    try {
        const std::vector<byte_range> short_remote{{0, 149}};
        (void)vmmpp::pair_pieces(local, short_remote);
        BOOST_FAIL("expected invalid_argument");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(std::string(e.what()).find("150") != std::string::npos, e.what());
        BOOST_TEST(std::string(e.what()).find("149") != std::string::npos, e.what());
    }
}

/// Review 2, G4: the totals were summed unchecked, so lists of different sizes whose sums wrap
/// to the same number were accepted and the pairing dropped the rest of the longer list.
BOOST_AUTO_TEST_CASE(piece_lists_whose_sizes_overflow_are_refused) {
    const auto refused_naming = [](const std::vector<byte_range>& local, const std::vector<byte_range>& remote,
                                   const std::vector<std::string>& numbers) {
        try {
            const auto pairs = vmmpp::pair_pieces(local, remote);
            BOOST_ERROR("accepted, " << pairs.size() << " pairs");
        } catch (const vmmpp::invalid_argument& e) {
            for (const std::string& n : numbers) {
                BOOST_TEST(std::string(e.what()).find(n) != std::string::npos, e.what() << " (expected " << n << ")");
            }
        }
    };
    const std::size_t big = SIZE_MAX - 4095;
    // 2^64 - 4096 + 8192 wraps to 4096, the remote list's total.
    refused_naming({{0, big}, {1 << 20, 8192}}, {{0, 4096}}, {"local", "piece 1", std::to_string(big), "8192"});
    refused_naming({{0, 4096}}, {{0, big}, {1 << 20, 8192}}, {"remote", "piece 1"});
    // One piece that ends past the address space.
    refused_naming({{SIZE_MAX - 10, 20}}, {{0, 20}}, {"local piece 0", std::to_string(SIZE_MAX - 10), "20"});
    // The largest pieces that fit are still paired.
    const std::vector<byte_range> whole{{0, SIZE_MAX}};
    const std::vector<byte_range> halves{{0, SIZE_MAX / 2}, {0, SIZE_MAX - SIZE_MAX / 2}};
    BOOST_TEST(vmmpp::pair_pieces(whole, halves).size() == 2u);
}

BOOST_AUTO_TEST_CASE(pieces_of_a_dead_block_are_refused) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major> cache(small);
    const vmmpp::seq_id a = cache.add_sequence();
    cache.append(a, 16);
    const std::int32_t live = cache.block_table(a)[0];
    const std::vector<std::int32_t> ids{live, live + 1};
    BOOST_CHECK_THROW((void)vmmpp::block_pieces(cache, ids), vmmpp::invalid_argument);
}

/// Blocks move from one cache to another through paired pieces, as a transfer engine would move
/// them: the destination blocks hold the source blocks' bytes, other blocks are untouched, and
/// every piece lies in one extent on both sides.
BOOST_AUTO_TEST_CASE_TEMPLATE(paired_pieces_move_blocks, Layout, layouts) {
    const vmmpp::kv_geometry g = fit_geometry<Layout>(small);
    vmmpp::kv_cache<vmmpp::host_config, Layout> src(g);
    vmmpp::kv_cache<host_extents_config, Layout> dst(g);

    // The source has blocks scattered by earlier frees; the destination takes fresh ones.
    const vmmpp::seq_id filler = src.add_sequence();
    src.append(filler, 16 * 130);
    const vmmpp::seq_id s = src.add_sequence();
    src.append(s, 16 * 140);  // crosses page boundaries
    src.free(filler);
    const vmmpp::seq_id other = dst.add_sequence();
    dst.append(other, 16 * 3);
    const vmmpp::seq_id d = dst.add_sequence();
    dst.append(d, 16 * 140);

    const auto src_ids = src.block_table(s);
    const auto dst_ids = dst.block_table(d);
    std::vector<std::int32_t> from(src_ids.begin(), src_ids.end());
    std::vector<std::int32_t> to(dst_ids.begin(), dst_ids.end());

    // Fill the source blocks (every byte of their pieces) and the destination's with zeros.
    for (std::size_t i = 0; i < from.size(); ++i) {
        Layout::for_each_piece(g, static_cast<std::uint32_t>(from[i]), [&](std::size_t off, std::size_t bytes) {
            for (std::size_t k = 0; k < bytes; ++k) {
                src.pool().base()[off + k] = static_cast<std::byte>((off + k * 7 + i * 13) % 251);
            }
        });
    }
    const std::vector<std::int32_t> other_ids(dst.block_table(other).begin(), dst.block_table(other).end());
    const auto before_other = vmmpp::block_pieces(dst, other_ids);
    std::vector<std::byte> other_bytes;
    for (const byte_range& p : before_other) {
        other_bytes.insert(other_bytes.end(), dst.pool().base() + p.offset, dst.pool().base() + p.offset + p.bytes);
    }

    const auto local = vmmpp::block_pieces(dst, to);
    const auto remote = vmmpp::block_pieces(src, from);
    check_inside_extents(local, dst.pool().committed_extents());
    check_inside_extents(remote, src.pool().committed_extents());
    BOOST_TEST(total(local) == total(remote));
    for (const vmmpp::piece_pair& p : vmmpp::pair_pieces(local, remote)) {
        std::memcpy(dst.pool().base() + p.local_offset, src.pool().base() + p.remote_offset, p.bytes);
    }

    for (std::size_t i = 0; i < from.size(); ++i) {
        std::vector<std::byte> a;
        std::vector<std::byte> b;
        Layout::for_each_piece(g, static_cast<std::uint32_t>(from[i]), [&](std::size_t off, std::size_t bytes) {
            a.insert(a.end(), src.pool().base() + off, src.pool().base() + off + bytes);
        });
        Layout::for_each_piece(g, static_cast<std::uint32_t>(to[i]), [&](std::size_t off, std::size_t bytes) {
            b.insert(b.end(), dst.pool().base() + off, dst.pool().base() + off + bytes);
        });
        BOOST_TEST((a == b), "block " << from[i] << " -> " << to[i]);
    }
    std::vector<std::byte> other_after;
    for (const byte_range& p : before_other) {
        other_after.insert(other_after.end(), dst.pool().base() + p.offset, dst.pool().base() + p.offset + p.bytes);
    }
    BOOST_TEST((other_after == other_bytes));
}
