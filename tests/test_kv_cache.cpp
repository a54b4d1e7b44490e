// kv_cache on the host configurations (CI runs these for real): every operation, every error
// with the cache unchanged, the range-v3 views, and a randomized run against a reference model.
#define BOOST_TEST_MODULE kv cache
#include "support/cpu_main.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <random>
#include <tuple>
#include <type_traits>
#include <unordered_map>

#include "support/kv_factories.hpp"
#include "support/kv_tokens.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/views.hpp"

using namespace vmmpp_test;
using vmmpp::kv_part;

namespace {

// host_config in every paged layout of vmmpp::kv_layouts (sequence_contiguous has its own suite,
// test_kv_sequence_contiguous.cpp), then other configurations in a few layouts each.
using kv_cases = vmmpp::apply_t<vmmpp::concat_t<kv_cases_over<vmmpp::host_config, vmmpp::paged_kv_layouts>, vmmpp::type_list<
    kv_case<host_chunked_budget_config>, kv_case<host_chunked_budget_config, vmmpp::packed_kv>,
    kv_case<host_chunked_budget_config, vmmpp::mla>, kv_case<host_external_config>,
    kv_case<host_external_config, vmmpp::layer_major_hnd>, kv_case<host_external_config, vmmpp::mla>,
    kv_case<host_preallocated_config, vmmpp::block_major>, kv_case<host_preallocated_config, vmmpp::block_major_hnd>,
    kv_case<host_preallocated_config, vmmpp::packed_kv>>>, std::tuple>;

// 2 layers, 2 heads, 64 dims, fp16, 16 tokens: a block tensor is 4 KiB, a block 16 KiB.
constexpr vmmpp::kv_geometry small{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 512};

/// What a test compares to prove "unchanged".
template <class Cache>
struct snapshot {
    std::size_t used, committed, seqs;
    std::map<vmmpp::seq_id, std::pair<std::size_t, std::vector<std::int32_t>>> tables;
    explicit snapshot(const Cache& c)
        : used(c.used_blocks()), committed(c.pool().committed_bytes()), seqs(c.sequence_count()) {
        for (auto id : vmmpp::sequence_ids(c)) {
            auto t = c.block_table(id);
            tables[id] = {c.tokens(id), {t.begin(), t.end()}};
        }
    }
    bool operator==(const snapshot&) const = default;
};

/// Element offset of [token, head, dim] from a block's K (or V) address, from the layout's
/// definition (written out here, independently of the library's strides).
template <class Layout>
std::int64_t in_block_offset(const vmmpp::kv_geometry& g, std::int64_t t, std::int64_t h, std::int64_t d) {
    const std::int64_t tokens = g.block_tokens, heads = g.kv_heads, dim = g.head_dim;
    if constexpr (std::is_same_v<Layout, vmmpp::layer_major> || std::is_same_v<Layout, vmmpp::block_major> ||
                  std::is_same_v<Layout, vmmpp::mla>) {
        return (t * heads + h) * dim + d;
    } else if constexpr (std::is_same_v<Layout, vmmpp::packed_kv>) {
        return (h * tokens + t) * 2 * dim + d;  // K|V rows of 2 x head_dim, heads before tokens
    } else {
        return (h * tokens + t) * dim + d;  // HND
    }
}

/// Bytes from one block to the next in a layer's tensor, from the layout's definition.
template <class Layout>
std::size_t expected_block_stride(const vmmpp::kv_geometry& g) {
    if constexpr (std::is_same_v<Layout, vmmpp::block_major> || std::is_same_v<Layout, vmmpp::block_major_hnd>) {
        return g.block_bytes();
    } else if constexpr (std::is_same_v<Layout, vmmpp::packed_kv>) {
        return 2 * g.block_tensor_bytes();
    } else {
        return g.block_tensor_bytes();
    }
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(append_fork_truncate_free, Case, kv_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    const auto a = c.add_sequence();
    BOOST_TEST(c.tokens(a) == 0u);
    const auto r = c.append(a, 40);  // 3 blocks: 16 + 16 + 8
    BOOST_TEST(r.first == 0u);
    BOOST_TEST(r.count == 40u);
    BOOST_TEST(c.used_blocks() == 3u);
    BOOST_TEST((std::vector<std::int32_t>(c.block_table(a).begin(), c.block_table(a).end()) ==
                std::vector<std::int32_t>{0, 1, 2}));
    std::vector<std::int64_t> slots(40);
    c.slot_mapping(a, 0, slots);
    BOOST_TEST(slots[0] == 0);
    BOOST_TEST(slots[17] == 17);
    BOOST_TEST(slots[39] == 2 * 16 + 7);
    for (std::size_t t = 0; t < 40; ++t) {
        write_token(c, slots[t], static_cast<std::uint16_t>(1000 + t));
    }

    // fork shares every block
    const auto b = c.fork(a);
    BOOST_TEST(c.tokens(b) == 40u);
    BOOST_TEST(c.used_blocks() == 3u);
    BOOST_TEST(c.block_refs(2) == 2u);

    // appending to the fork copies the shared partial block first
    c.append(b, 1);
    BOOST_TEST(c.cow_copies() == 1u);
    BOOST_TEST(c.block_table(b)[2] == 3);
    BOOST_TEST(c.block_refs(2) == 1u);
    BOOST_TEST(c.block_refs(0) == 2u);
    std::vector<std::int64_t> bslots(41);
    c.slot_mapping(b, 0, bslots);
    for (std::size_t t = 0; t < 40; ++t) {  // the copy carries every layer's K and V
        BOOST_TEST(read_token(c, bslots[t]).first == 1000 + t);
        BOOST_TEST(read_token(c, bslots[t]).second == 1000 + t);
    }
    write_token(c, bslots[40], 7);
    BOOST_TEST(read_token(c, slots[39]).first == 1039u);  // the parent's copy is untouched

    // the parent appends into its own block now (no longer shared): no copy
    c.append(a, 8);
    BOOST_TEST(c.cow_copies() == 1u);
    BOOST_TEST(c.used_blocks() == 4u);
    c.append(a, 1);  // block 2 is full: a new block, the lowest free id
    BOOST_TEST(c.block_table(a)[3] == 4);

    // truncate gives back blocks beyond the kept tokens
    c.truncate(a, 20);
    BOOST_TEST(c.tokens(a) == 20u);
    BOOST_TEST(c.block_table(a).size() == 2u);
    BOOST_TEST(c.block_refs(2) == 0u);
    BOOST_TEST(c.block_refs(4) == 0u);
    c.truncate(a, 20);  // no-op
    // truncate into a shared block, then append: copy-on-write again
    c.append(a, 1);
    BOOST_TEST(c.cow_copies() == 2u);

    c.free(a);
    c.free(b);
    BOOST_TEST(c.used_blocks() == 0u);
    BOOST_TEST(c.sequence_count() == 0u);
    if constexpr (Case::config::growth_type::is_elastic) {
        BOOST_TEST(c.pool().committed_bytes() == 0u);
    } else {
        BOOST_TEST(c.pool().committed_bytes() == c.pool().capacity());
    }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(lowest_free_block_first, Case, kv_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    std::vector<vmmpp::seq_id> s;
    for (int i = 0; i < 4; ++i) {
        s.push_back(c.add_sequence());
        c.append(s.back(), 16);
    }
    c.free(s[1]);
    c.free(s[2]);
    const auto n = c.add_sequence();
    c.append(n, 32);
    BOOST_TEST(c.block_table(n)[0] == 1);
    BOOST_TEST(c.block_table(n)[1] == 2);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(bad_input_is_an_error_and_changes_nothing, Case, kv_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    const auto a = c.add_sequence();
    c.append(a, 20);
    const auto freed = c.fork(a);
    c.free(freed);
    const snapshot<typename Case::cache> before(c);
    auto expect = [&](auto op, auto exception_tag) {
        using E = decltype(exception_tag);
        BOOST_CHECK_THROW(op(), E);
        BOOST_TEST((snapshot<typename Case::cache>(c) == before));
    };
    std::vector<std::int64_t> slots(4);
    std::vector<std::int32_t> table(4);
    const vmmpp::seq_id unknown = 12345;
    for (vmmpp::seq_id bad : {freed, unknown}) {
        expect([&] { c.append(bad, 1); }, vmmpp::invalid_argument{""});
        expect([&] { (void)c.fork(bad); }, vmmpp::invalid_argument{""});
        expect([&] { c.truncate(bad, 0); }, vmmpp::invalid_argument{""});
        expect([&] { c.free(bad); }, vmmpp::invalid_argument{""});  // double free
        expect([&] { (void)c.block_table(bad); }, vmmpp::invalid_argument{""});
        expect([&] { c.slot_mapping(bad, 0, slots); }, vmmpp::invalid_argument{""});
        expect([&] { (void)c.can_append(bad, 1); }, vmmpp::invalid_argument{""});
        const vmmpp::seq_id both[] = {a, bad};
        expect([&] { c.pack_block_tables(both, 2, table); }, vmmpp::invalid_argument{""});
    }
    expect([&] { c.append(a, 512 * 16); }, vmmpp::out_of_blocks(0, 0, 0));  // past the maximum
    expect([&] { c.append(a, SIZE_MAX); }, vmmpp::out_of_blocks(0, 0, 0));  // no wrap-around
    BOOST_TEST(!c.can_append(a, 512 * 16));
    BOOST_TEST(c.can_append(a, 510 * 16));
    expect([&] { c.truncate(a, 21); }, vmmpp::invalid_argument{""});
    expect([&] { c.slot_mapping(a, 18, slots); }, vmmpp::invalid_argument{""});
    expect([&] { (void)c.key(2, 0); }, vmmpp::invalid_argument{""});
    expect([&] { (void)c.value(0, 512); }, vmmpp::invalid_argument{""});
    expect([&] { (void)c.key(0, -1); }, vmmpp::invalid_argument{""});
    const vmmpp::seq_id one[] = {a};
    expect([&] { c.pack_block_tables(one, 1, std::span<std::int32_t>(table).first(1)); },
           vmmpp::invalid_argument{""});  // a has 2 blocks
    expect([&] { c.pack_block_tables(one, 2, table); }, vmmpp::invalid_argument{""});  // wrong size
}

BOOST_AUTO_TEST_CASE(geometry_is_validated) {
    auto with = [](auto change) {
        vmmpp::kv_geometry g = small;
        change(g);
        return g;
    };
    auto rejects = [](const vmmpp::kv_geometry& g, const char* needle) {
        try {
            vmmpp::kv_cache<vmmpp::host_config> c(g);
            BOOST_ERROR("accepted: " << needle);
        } catch (const vmmpp::invalid_argument& e) {
            BOOST_TEST(std::string(e.what()).find(needle) != std::string::npos, e.what());
        }
    };
    auto rejects_mla = [](const vmmpp::kv_geometry& g, const char* needle) {
        try {
            vmmpp::kv_cache<vmmpp::host_config, vmmpp::mla> c(g);
            BOOST_ERROR("mla accepted: " << needle);
        } catch (const vmmpp::invalid_argument& e) {
            BOOST_TEST(std::string(e.what()).find(needle) != std::string::npos, e.what());
        }
    };
    rejects_mla(small, "kv_heads is 2: the mla layout");  // one latent per token
    rejects_mla(with([](auto& g) {
                    g.kv_heads = 1;
                    g.head_dim = 0;  // a latent of size 0
                }),
                "head_dim must not be zero");
    rejects_mla(with([](auto& g) {
                    g.kv_heads = 1;
                    g.layers = 0xffffffffu;
                    g.head_dim = 0xffffffffu;
                }),
                "overflows");
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::mla> fits(with([](auto& g) {
        g.kv_heads = 1;
        g.head_dim = 576;  // DeepSeek V3: kv_lora_rank 512 + rope 64
    }));
    BOOST_TEST(fits.geometry().head_dim == 576u);
    rejects(with([](auto& g) { g.layers = 0; }), "layers");
    rejects(with([](auto& g) { g.kv_heads = 0; }), "kv_heads");
    rejects(with([](auto& g) { g.head_dim = 0; }), "head_dim");
    rejects(with([](auto& g) { g.block_tokens = 0; }), "block_tokens");
    rejects(with([](auto& g) { g.max_blocks = 0; }), "max_blocks");
    rejects(with([](auto& g) { g.max_blocks = 0x80000000u; }), "INT32_MAX");
    rejects(with([](auto& g) {
                g.layers = 0xffffffffu;
                g.head_dim = 0xffffffffu;
                g.kv_heads = 0xffffffffu;
            }),
            "overflows");
    // A geometry that fits no address space is an out_of_memory from the backing.
    BOOST_CHECK_THROW((vmmpp::kv_cache<vmmpp::host_config>(with([](auto& g) {
                          g.layers = 1u << 16;
                          g.head_dim = 1u << 16;
                          g.max_blocks = 1u << 20;
                      }))),
                      vmmpp::error);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(tensors_describe_the_layout, Case, kv_cases) {
    using layout = typename Case::layout;
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    const vmmpp::kv_geometry& g = c.geometry();
    const auto seq = c.add_sequence();
    c.append(seq, 8 * 16);  // blocks 0..7 held: their memory may be written
    std::vector<kv_part> parts{kv_part::key};
    if (layout::parts == 2) {
        parts.push_back(kv_part::value);
    }
    std::uint16_t next = 1;
    for (std::uint32_t l = 0; l < g.layers; ++l) {
        for (auto part : parts) {
            const auto t = c.tensor(l, part);
            BOOST_TEST(t.shape[0] == 512);
            BOOST_TEST(t.shape[1] == 16);
            BOOST_TEST(t.shape[2] == static_cast<std::int64_t>(g.kv_heads));
            BOOST_TEST(t.shape[3] == static_cast<std::int64_t>(g.head_dim));
            BOOST_TEST(t.strides[0] * 2 == static_cast<std::int64_t>(expected_block_stride<layout>(g)));
            BOOST_TEST(t.device == -1);
            BOOST_TEST(t.data == static_cast<void*>(c.address(l, part, 0)));
            for (std::int32_t b : {0, 1, 7, 511}) {
                for (std::int64_t tok : {0, 5, 15}) {
                    for (std::int64_t h = 0; h < t.shape[2]; ++h) {
                        for (std::int64_t d : {std::int64_t{0}, std::int64_t{3}, t.shape[3] - 1}) {
                            // the descriptor's element [b, tok, h, d] is where address() and the
                            // layout's definition put it
                            const std::int64_t index =
                                t.strides[0] * b + t.strides[1] * tok + t.strides[2] * h + d * t.strides[3];
                            auto* elem = static_cast<std::byte*>(t.data) + index * 2;
                            auto* expected = c.address(l, part, b) + in_block_offset<layout>(g, tok, h, d) * 2;
                            BOOST_TEST((elem == expected));
                            if (b < 8) {  // a value written through the strides reads back at address()
                                const std::uint16_t v = next++;
                                std::memcpy(elem, &v, 2);
                                std::uint16_t back = 0;
                                std::memcpy(&back, expected, 2);
                                BOOST_TEST(back == v);
                            }
                        }
                    }
                }
            }
        }
    }
    // Every element of a block lies in one of its pieces, and no two elements share a byte.
    std::vector<std::pair<std::size_t, std::size_t>> pieces;
    layout::for_each_piece(g, 3, [&](std::size_t off, std::size_t bytes) { pieces.emplace_back(off, bytes); });
    std::size_t piece_bytes = 0;
    for (auto [off, bytes] : pieces) {
        piece_bytes += bytes;
    }
    std::vector<std::size_t> offsets;
    for (std::uint32_t l = 0; l < g.layers; ++l) {
        for (auto part : parts) {
            const std::size_t at = layout::offset(g, l, part, 3);
            for (std::int64_t tok = 0; tok < g.block_tokens; ++tok) {
                for (std::int64_t h = 0; h < g.kv_heads; ++h) {
                    for (std::int64_t d = 0; d < g.head_dim; ++d) {
                        const std::size_t o = at + static_cast<std::size_t>(in_block_offset<layout>(g, tok, h, d)) * 2;
                        const bool inside = std::any_of(pieces.begin(), pieces.end(), [&](auto p) {
                            return o >= p.first && o + 2 <= p.first + p.second;
                        });
                        if (!inside) {
                            BOOST_ERROR("layer " << l << " element outside block 3's pieces");
                            return;
                        }
                        offsets.push_back(o);
                    }
                }
            }
        }
    }
    std::sort(offsets.begin(), offsets.end());
    BOOST_TEST((std::adjacent_find(offsets.begin(), offsets.end()) == offsets.end()));
    BOOST_TEST(offsets.size() * 2 == piece_bytes);  // the pieces hold exactly the block's elements
    // copy_shape's rows are the pieces
    const auto shape = layout::copy_shape(g);
    BOOST_TEST(shape.rows == pieces.size());
    for (std::size_t r = 0; r < pieces.size(); ++r) {
        BOOST_TEST(pieces[r].first == layout::offset(g, 0, kv_part::key, 3) + r * shape.pitch);
        BOOST_TEST(pieces[r].second == shape.width);
    }
    // the last block's last piece ends the span
    std::size_t end = 0;
    layout::for_each_piece(g, g.max_blocks - 1,
                           [&](std::size_t off, std::size_t bytes) { end = std::max(end, off + bytes); });
    BOOST_TEST(end == layout::span_bytes(g));
}

BOOST_AUTO_TEST_CASE(packed_kv_views_and_the_packed_tensor) {
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::packed_kv> c(small);
    for (std::uint32_t l = 0; l < small.layers; ++l) {
        const auto p = c.packed_tensor(l);
        const auto k = c.tensor(l, kv_part::key);
        const auto v = c.tensor(l, kv_part::value);
        BOOST_TEST((p.shape == std::array<std::int64_t, 4>{512, 16, 2, 128}), boost::test_tools::per_element());
        // vLLM's [blocks, heads, tokens, 2 x head_dim], contiguous, read in [b, t, h, d] order
        BOOST_TEST((p.strides == std::array<std::int64_t, 4>{2 * 16 * 128, 128, 16 * 128, 1}),
                   boost::test_tools::per_element());
        BOOST_TEST(k.strides == p.strides, boost::test_tools::per_element());
        BOOST_TEST(v.strides == p.strides, boost::test_tools::per_element());
        BOOST_TEST(k.data == p.data);
        BOOST_TEST(static_cast<std::byte*>(v.data) == static_cast<std::byte*>(p.data) + 64 * 2);  // V: [..., 64:]
        BOOST_TEST(static_cast<std::byte*>(p.data) == c.pool().base() + l * 512 * 2 * small.block_tensor_bytes());
    }
    BOOST_CHECK_THROW((void)c.packed_tensor(small.layers), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(mla_has_one_latent_and_no_value) {
    const vmmpp::kv_geometry g{.layers = 3, .kv_heads = 1, .head_dim = 576, .type = vmmpp::dtype::bf16,
                               .block_tokens = 64, .max_blocks = 32};
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::mla> c(g);
    BOOST_TEST(vmmpp::mla::span_bytes(g) == std::size_t{3} * 32 * 64 * 576 * 2);  // half of K + V
    const auto t = c.tensor(1, kv_part::key);
    BOOST_TEST((t.shape == std::array<std::int64_t, 4>{32, 64, 1, 576}), boost::test_tools::per_element());
    BOOST_TEST((t.strides == std::array<std::int64_t, 4>{64 * 576, 576, 576, 1}), boost::test_tools::per_element());
    BOOST_TEST(static_cast<std::byte*>(t.data) == c.pool().base() + std::size_t{32} * 64 * 576 * 2);
    try {
        (void)c.tensor(1, kv_part::value);
        BOOST_ERROR("mla gave a value tensor");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(std::string(e.what()).find("the mla layout has 1 part") != std::string::npos, e.what());
    }
    BOOST_CHECK_THROW((void)c.value(0, 0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW((void)c.address(0, static_cast<kv_part>(7), 0), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(block_tables_and_views, Case, kv_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(small);
    auto& c = *cache;
    const auto a = c.add_sequence();
    const auto b = c.add_sequence();
    c.append(a, 33);
    c.append(b, 5);
    const vmmpp::seq_id seqs[] = {b, a};
    std::vector<std::int32_t> packed(2 * 4);
    c.pack_block_tables(seqs, 4, packed, -1);
    BOOST_TEST((packed == std::vector<std::int32_t>{3, -1, -1, -1, 0, 1, 2, -1}));

    std::vector<vmmpp::seq_id> ids;
    for (auto id : vmmpp::sequence_ids(c)) {
        ids.push_back(id);
    }
    BOOST_TEST((ids == std::vector<vmmpp::seq_id>{a, b}));

    std::vector<std::size_t> tokens;
    for (auto blk : vmmpp::blocks(c, a)) {
        BOOST_TEST(blk.id == c.block_table(a)[blk.index]);
        tokens.push_back(blk.tokens);
    }
    BOOST_TEST((tokens == std::vector<std::size_t>{16, 16, 1}));

    std::size_t region_bytes = 0;
    std::byte* last = nullptr;
    for (auto region : vmmpp::committed_regions(c)) {
        BOOST_TEST((region.address > last));
        last = region.address;
        region_bytes += region.bytes;
        BOOST_TEST(region.device == -1);
    }
    BOOST_TEST(region_bytes == c.pool().committed_bytes());
}

BOOST_AUTO_TEST_CASE(a_failed_append_changes_nothing) {
    // A budget of 5 pages: with the layer-major layout a first block touches 2 layers x K/V = 4
    // pages, so an append needing a block in a fifth region... a tight budget refuses it.
    using case_t = kv_case<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>>;
    kv_factory<case_t> factory;
    factory.limit = 3 * page;  // less than the 4 pages the first block needs
    auto cache = factory.make(small);
    auto& c = *cache;
    const auto a = c.add_sequence();
    const snapshot<case_t::cache> before(c);
    BOOST_CHECK_THROW(c.append(a, 1), vmmpp::over_quota);
    BOOST_TEST((snapshot<case_t::cache>(c) == before));
    BOOST_TEST(c.pool().committed_bytes() == 0u);
    BOOST_TEST(factory.budget->stats().committed == 0u);
    BOOST_TEST(c.free_blocks() == 512u);
}

BOOST_AUTO_TEST_CASE(a_failed_copy_on_write_changes_nothing) {
    // block-major: a block is 16 KiB, 128 blocks per page. Fill a page, fork, then make the
    // copy-on-write need a second page the budget refuses.
    using case_t = kv_case<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>,
                           vmmpp::block_major>;
    kv_factory<case_t> factory;
    factory.limit = page;
    auto cache = factory.make(small);
    auto& c = *cache;
    const auto a = c.add_sequence();
    c.append(a, 128 * 16 - 8);  // 128 blocks, the last one half full: exactly one page
    const auto b = c.fork(a);
    const snapshot<case_t::cache> before(c);
    BOOST_CHECK_THROW(c.append(b, 1), vmmpp::over_quota);
    BOOST_TEST((snapshot<case_t::cache>(c) == before));
    BOOST_TEST(c.cow_copies() == 0u);
    BOOST_TEST(c.block_refs(127) == 2u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(random_operations_match_a_reference_model, Case, kv_cases) {
    constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 1, .head_dim = 32, .type = vmmpp::dtype::f16,
                                   .block_tokens = 4, .max_blocks = 1024};
    kv_factory<Case> factory;
    auto cache = factory.make(g);
    auto& c = *cache;
    const unsigned seed = std::random_device{}();
    BOOST_TEST_MESSAGE("seed " << seed);
    std::mt19937_64 rng(seed);

    // The model: per sequence, its tokens' values and its blocks' identities. Identities are
    // shared only through fork; a block id must map to exactly one live identity.
    struct model_seq {
        std::vector<std::uint16_t> tokens;
        std::vector<std::uint64_t> identity;
    };
    std::map<vmmpp::seq_id, model_seq> model;
    std::uint64_t next_identity = 1;
    std::uint16_t next_value = 1;
    std::size_t ops = 0, refused = 0;

    auto fail = [&](const std::string& what) { BOOST_FAIL("op " << ops << " (seed " << seed << "): " << what); };
    auto check = [&](bool full) {
        std::unordered_map<std::uint64_t, std::int32_t> id_of;
        std::vector<std::uint32_t> refs(g.max_blocks, 0);
        for (auto& [sid, m] : model) {
            const auto table = c.block_table(sid);
            if (c.tokens(sid) != m.tokens.size() || table.size() != m.identity.size() ||
                table.size() != g.blocks_for(m.tokens.size())) {
                fail("sequence shape differs");
            }
            for (std::size_t i = 0; i < table.size(); ++i) {
                auto [it, inserted] = id_of.emplace(m.identity[i], table[i]);
                if (!inserted && it->second != table[i]) {
                    fail("one identity, two blocks");
                }
                if (inserted) {
                    ++refs[table[i]];
                }
            }
        }
        std::vector<std::uint32_t> holders(g.max_blocks, 0);
        for (auto& [sid, m] : model) {
            for (std::size_t i = 0; i < m.identity.size(); ++i) {
                ++holders[static_cast<std::size_t>(id_of[m.identity[i]])];
            }
        }
        for (std::int32_t block = 0; block < static_cast<std::int32_t>(g.max_blocks); ++block) {
            if (refs[static_cast<std::size_t>(block)] > 1) {
                fail("block " + std::to_string(block) + " holds two identities: shared without fork");
            }
            if (c.block_refs(block) != holders[static_cast<std::size_t>(block)]) {
                fail("refcount of block " + std::to_string(block));
            }
        }
        if (c.used_blocks() != id_of.size()) {
            fail("used blocks " + std::to_string(c.used_blocks()) + " vs live " + std::to_string(id_of.size()));
        }
        // Committed memory covers exactly the units under live blocks (no spares configured).
        std::vector<bool> held(c.pool().capacity() / c.pool().page_bytes(), false);
        for (auto& [identity, block] : id_of) {
            Case::layout::for_each_piece(g, static_cast<std::uint32_t>(block), [&](std::size_t off, std::size_t bytes) {
                for (std::size_t p = off / page; p <= (off + bytes - 1) / page; ++p) {
                    held[p] = true;
                }
            });
        }
        if (c.pool().committed_bytes() != expected_committed<typename Case::config>(c.pool(), held)) {
            fail("committed " + std::to_string(c.pool().committed_bytes()) + " vs expected " +
                 std::to_string(expected_committed<typename Case::config>(c.pool(), held)));
        }
        if (full) {
            for (auto& [sid, m] : model) {
                std::vector<std::int64_t> slots(m.tokens.size());
                c.slot_mapping(sid, 0, slots);
                for (std::size_t t = 0; t < slots.size(); ++t) {
                    auto [k, v] = read_token(c, slots[t]);
                    if (k != m.tokens[t] || v != m.tokens[t]) {
                        fail("token " + std::to_string(t) + " of sequence " + std::to_string(sid) + " lost its value");
                    }
                }
            }
        }
    };

    for (ops = 0; ops < 100000; ++ops) {
        const unsigned op = rng() % 100;
        if (model.empty() || op < 10) {
            if (model.size() < 48) {
                model.emplace(c.add_sequence(), model_seq{});
            }
            continue;
        }
        auto it = model.begin();
        std::advance(it, static_cast<std::ptrdiff_t>(rng() % model.size()));
        const vmmpp::seq_id sid = it->first;
        model_seq& m = it->second;
        if (op < 60) {  // append
            const std::size_t n = 1 + rng() % (rng() % 8 == 0 ? 40 : 5);
            const std::size_t old = m.tokens.size();
            const bool shared_partial =
                old % g.block_tokens != 0 && c.block_refs(c.block_table(sid).back()) > 1;
            try {
                c.append(sid, n);
            } catch (const vmmpp::out_of_blocks&) {
                ++refused;
                continue;
            }
            if (shared_partial) {
                m.identity.back() = next_identity++;
            }
            while (m.identity.size() < g.blocks_for(old + n)) {
                m.identity.push_back(next_identity++);
            }
            std::vector<std::int64_t> slots(n);
            c.slot_mapping(sid, old, slots);
            for (std::size_t i = 0; i < n; ++i) {
                m.tokens.push_back(next_value);
                write_token(c, slots[i], next_value++);
            }
        } else if (op < 72) {  // fork
            if (model.size() < 48) {
                const auto child = c.fork(sid);
                model.emplace(child, m);
            }
        } else if (op < 86) {  // truncate
            const std::size_t keep = m.tokens.empty() ? 0 : rng() % (m.tokens.size() + 1);
            c.truncate(sid, keep);
            m.tokens.resize(keep);
            m.identity.resize(g.blocks_for(keep));
        } else {  // free
            c.free(sid);
            model.erase(it);
            BOOST_CHECK_THROW(c.free(sid), vmmpp::invalid_argument);
        }
        if (ops % 16 == 0) {
            check(ops % 1024 == 0);
        }
    }
    check(true);
    BOOST_TEST_MESSAGE(ops << " operations, " << refused << " appends refused for lack of blocks, "
                           << c.cow_copies() << " copy-on-write copies");
    BOOST_TEST(c.cow_copies() > 0u);
}

// --- regressions from the review of 007dd5d ---

// F1: rows x columns of a block table wrapped around size_t (2 x 2^63 = 0), so an empty output
// passed the size check and the rows were written far past it.
BOOST_AUTO_TEST_CASE(block_tables_whose_size_overflows_are_refused) {
    vmmpp::kv_cache<vmmpp::host_config> cache(small);
    const std::vector<vmmpp::seq_id> seqs{cache.add_sequence(), cache.add_sequence()};
    cache.append(seqs[0], 20);
    std::vector<std::int32_t> out(4, -7);
    const std::size_t wraps = std::size_t{1} << 63;  // 2 * 2^63 == 0 in size_t
    BOOST_CHECK_THROW(cache.pack_block_tables(seqs, wraps, std::span<std::int32_t>(out.data(), 0)),
                      vmmpp::invalid_argument);
    BOOST_CHECK_THROW(cache.pack_block_tables(seqs, small.max_blocks + 1, out), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(cache.upload_block_tables(seqs, wraps, nullptr, nullptr), vmmpp::invalid_argument);
    BOOST_TEST(out == std::vector<std::int32_t>(4, -7), boost::test_tools::per_element());
    cache.pack_block_tables(seqs, 2, out, -1);  // the real shape still works
    BOOST_TEST(out[0] == 0);
    BOOST_TEST(out[1] == 1);
    BOOST_TEST(out[2] == -1);
}

// F9: block_allocator::release grew its free list on demand; a bad_alloc there left an id with no
// references that was neither free nor counted, and free() of a sequence then leaked blocks.
namespace {
std::atomic<bool> refuse_allocations{false};
} // namespace
// The replacements pair malloc with free, as they must; GCC's mismatched-new-delete check sees
// only the free and the new at the sites it inlines them into, and warns wrongly at -O2 and up.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t bytes) {
    if (refuse_allocations.load(std::memory_order_relaxed)) {
        throw std::bad_alloc();
    }
    if (void* p = std::malloc(bytes == 0 ? 1 : bytes)) {
        return p;
    }
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

BOOST_AUTO_TEST_CASE(releasing_blocks_never_allocates) {
    vmmpp::block_allocator blocks(64);
    std::vector<std::int32_t> ids;
    for (int i = 0; i < 64; ++i) {
        ids.push_back(blocks.allocate());
    }
    blocks.retain(ids[5]);
    refuse_allocations = true;
    bool threw = false;
    try {
        for (std::int32_t id : ids) {
            (void)blocks.release(id);
        }
        (void)blocks.release(ids[5]);
    } catch (const std::bad_alloc&) {
        threw = true;
    }
    refuse_allocations = false;
    BOOST_TEST(!threw);
    BOOST_TEST(blocks.used_blocks() == 0u);
    BOOST_TEST(blocks.allocate() == 0);  // lowest first, every id back
    BOOST_TEST(blocks.allocate() == 1);
}

// elastic_config's growth (adaptive_extents) on the host: a prompt's blocks, appended in one
// call, are committed as one extent, and go back when its sequence ends.
BOOST_AUTO_TEST_CASE(a_prompt_is_committed_in_one_extent_that_leaves_with_its_sequence) {
    // block_major, one block = 2 layers x K/V x 16 tokens x 64 heads x 64 dims x 2 bytes = 512 KiB.
    constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 64, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 256};
    vmmpp::budget budget(std::size_t{1} << 30);
    vmmpp::kv_cache<host_adaptive_config> cache(g, {}, vmmpp::adaptive_extents{.spare_pages = 0},
                                                budget.register_model("m", std::size_t{1} << 30));
    const auto first = cache.add_sequence();
    cache.append(first, 16 * 40);  // 40 blocks, 20 MiB: ten pages
    BOOST_TEST(cache.pool().stats().commits == 1u);
    BOOST_TEST(cache.pool().committed_bytes() == 10 * page);
    const auto second = cache.add_sequence();
    cache.append(second, 16 * 24);  // 24 blocks from block 40 on: pages 10 to 15, one more extent
    BOOST_TEST(cache.pool().stats().commits == 2u);
    BOOST_TEST(cache.pool().committed_bytes() == 16 * page);
    cache.free(second);
    BOOST_TEST(cache.pool().committed_bytes() == 10 * page);  // its extent went with it
    BOOST_TEST(budget.stats().committed == 10 * page);
    cache.free(first);
    BOOST_TEST(cache.pool().committed_bytes() == 0u);
}

// Regression (found by the serving engine of issue 17): under a budget that refuses commits, an
// append's commit-ahead made room by giving back the extents it had just committed for the same
// append, and its rollback then "decommitted" them twice; the pool took them for committed
// spares and a later free failed in the backing ("granule ... is not committed"). Churn under a
// tight budget, refusals included, with the budget and the pool agreeing after every step.
BOOST_AUTO_TEST_CASE(adaptive_extents_under_a_refusing_budget_stay_consistent) {
    constexpr vmmpp::kv_geometry g{.layers = 8, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                   .block_tokens = 16, .max_blocks = 2048};  // 512 KiB blocks
    constexpr std::size_t limit = std::size_t{64} << 20;
    vmmpp::budget budget(limit);
    for (unsigned seed = 1; seed <= 3; ++seed) {
        vmmpp::kv_cache<host_adaptive_config> cache(g, {}, {}, budget.register_model("m" + std::to_string(seed), limit));
        std::mt19937 rng(seed);
        std::vector<vmmpp::seq_id> seqs;
        std::size_t refused = 0;
        for (int step = 0; step < 3000; ++step) {
            const unsigned op = rng() % 10;
            if (op < 3 || seqs.empty()) {
                const auto s = cache.add_sequence();
                try {
                    (void)cache.append(s, 16 + rng() % 1500);
                    seqs.push_back(s);
                } catch (const vmmpp::over_quota&) {
                    cache.free(s);
                    ++refused;
                }
            } else if (op < 8) {
                try {
                    (void)cache.append(seqs[rng() % seqs.size()], 1 + rng() % 64);
                } catch (const vmmpp::over_quota&) {
                    ++refused;
                }
            } else if (op == 8) {
                const auto k = rng() % seqs.size();
                cache.free(seqs[k]);
                seqs.erase(seqs.begin() + static_cast<std::ptrdiff_t>(k));
            } else {
                const auto s = seqs[rng() % seqs.size()];
                cache.truncate(s, cache.tokens(s) / 2);
            }
            const auto st = cache.pool().stats();
            BOOST_REQUIRE_MESSAGE(st.charged == st.committed && st.committed == cache.pool().backing().committed_bytes(),
                                  "seed " << seed << " step " << step << ": charged " << st.charged << ", committed "
                                          << st.committed << ", backing " << cache.pool().backing().committed_bytes());
        }
        BOOST_TEST(refused > 0u);  // the budget did refuse
        for (const auto s : seqs) {
            cache.free(s);
        }
        (void)cache.pool().trim();
        BOOST_TEST(cache.pool().committed_bytes() == 0u);
    }
    BOOST_TEST(budget.stats().committed == 0u);
}
