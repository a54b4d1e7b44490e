// copy_blocks between a layer_major (and a packed_kv) GPU cache and page-locked blocks_contiguous
// memory through the staging kernel (kv/detail/staged_copy.hpp), on the fake driver, which runs
// the kernel in stream order: every piece of scattered GPU blocks lands in its place in whole host
// blocks and comes back in place, in chunks of 64 blocks; the scratch memory goes back when the
// stream gets there; a GPU with no memory to spare for the staging buffer gets the copies piece
// by piece; the host tier over a layer_major cache spills and loads through it. And the layout
// adaptor itself: blocks_contiguous<L> puts each (layer, K/V) where L's piece order says.
#define BOOST_TEST_MODULE staged copies on the fake driver
#include "support/cpu_main.hpp"

#include <cstring>
#include <vector>

#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/blocks_contiguous.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/tier/host_tier.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::differing_bytes;
using vmmpp_test::fill_block_pieces;

namespace {

// 4 layers, 2 heads of 64, fp16, 16 tokens: 8 pieces of 4 KiB a block (32 KiB).
constexpr vmmpp::kv_geometry geom{.layers = 4, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 320};
constexpr std::size_t piece = 16 * 2 * 64 * 2;
constexpr std::size_t rows = 2 * 4;
constexpr std::size_t block_bytes = rows * piece;
constexpr std::size_t budget_bytes = std::size_t{64} << 20;
using gpu_t = vmmpp::kv_cache<vmmpp::elastic_page_config, vmmpp::layer_major>;
using host_t = vmmpp::kv_cache<vmmpp::pinned_host_config, vmmpp::blocks_contiguous<vmmpp::layer_major>>;
constexpr vmmpp::pinned_host_options host_pages{.page_bytes = std::size_t{64} << 10};

/// The byte at `i` of piece `r` of a block tagged `tag`: no two pieces alike.
unsigned char pattern(std::int32_t tag, std::size_t r, std::size_t i) {
    return static_cast<unsigned char>(tag * 31 + static_cast<int>(r) * 7 + static_cast<int>(i % 251));
}
/// Piece r of block b of cache c: the layout's copy_shape, `rows` pieces `pitch` apart (in
/// layer_major, layer r / 2's K or V).
template <class Cache>
std::byte* piece_of(const Cache& c, std::int32_t b, std::size_t r) {
    return c.address(0, vmmpp::kv_part::key, b) + r * Cache::layout_type::copy_shape(c.geometry()).pitch;
}
/// Fills block `b`'s pieces with `tag`'s pattern.
template <class Cache>
void fill(const Cache& c, std::int32_t b, std::int32_t tag) {
    const auto shape = Cache::layout_type::copy_shape(c.geometry());
    for (std::size_t r = 0; r < shape.rows; ++r) {
        std::byte* p = piece_of(c, b, r);
        for (std::size_t i = 0; i < shape.width; ++i) {
            p[i] = static_cast<std::byte>(pattern(tag, r, i));
        }
    }
}
/// Bytes of block `b`'s pieces that differ from `tag`'s pattern.
template <class Cache>
std::size_t wrong(const Cache& c, std::int32_t b, std::int32_t tag) {
    const auto shape = Cache::layout_type::copy_shape(c.geometry());
    std::size_t bad = 0;
    for (std::size_t r = 0; r < shape.rows; ++r) {
        const std::byte* p = piece_of(c, b, r);
        for (std::size_t i = 0; i < shape.width; ++i) {
            bad += static_cast<unsigned char>(p[i]) != pattern(tag, r, i);
        }
    }
    return bad;
}
std::size_t wrong_on_gpu(const gpu_t& c, std::int32_t b, std::int32_t tag) { return wrong(c, b, tag); }
std::size_t wrong_on_host(const host_t& c, std::int32_t b, std::int32_t tag) { return wrong(c, b, tag); }
/// `n` blocks of `c`, every other id (no two adjacent, as an eviction's victims).
template <class Cache>
std::vector<std::int32_t> every_other(Cache& c, std::size_t n) {
    std::vector<std::int32_t> all, kept;
    for (std::size_t i = 0; i < 2 * n; ++i) {
        all.push_back(c.take_block(nullptr));
    }
    for (std::size_t i = 0; i < all.size(); ++i) {
        if (i % 2 == 0) {
            kept.push_back(all[i]);
        } else {
            c.release_block(all[i]);
        }
    }
    return kept;
}

struct rig {
    vmmpp::budget budget{budget_bytes};
    gpu_t gpu{geom, {}, {}, budget.register_model("kv", budget_bytes)};
    host_t host{geom, host_pages};
    fakecuda::stream stream;
};

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);

BOOST_AUTO_TEST_CASE(blocks_contiguous_keeps_each_piece_in_the_base_layouts_order) {
    auto check = [](auto base, const vmmpp::kv_geometry& g) {
        using L = decltype(base);
        using C = vmmpp::blocks_contiguous<L>;
        constexpr std::uint32_t b = 3;
        const auto shape = L::copy_shape(g);
        std::vector<std::size_t> pieces;  // L's pieces of block b, in order
        L::for_each_piece(g, b, [&](std::size_t off, std::size_t) { pieces.push_back(off); });
        BOOST_TEST_REQUIRE(pieces.size() == shape.rows);
        BOOST_TEST(C::block_bytes(g) == shape.rows * shape.width);
        BOOST_TEST(C::span_bytes(g) == C::block_bytes(g) * g.max_blocks);
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            for (unsigned part = 0; part < L::parts; ++part) {
                const auto p = static_cast<vmmpp::kv_part>(part);
                const std::size_t off = L::offset(g, l, p, b);
                std::size_t k = 0;
                while (k < pieces.size() && !(pieces[k] <= off && off < pieces[k] + shape.width)) {
                    ++k;
                }
                BOOST_TEST_REQUIRE(k < pieces.size());
                BOOST_TEST(C::offset(g, l, p, b) == b * C::block_bytes(g) + k * shape.width + (off - pieces[k]),
                           L::name << " layer " << l << " part " << part);
            }
        }
        const auto s = C::strides(g);
        BOOST_TEST(s[0] * static_cast<std::int64_t>(vmmpp::size_of(g.type)) ==
                   static_cast<std::int64_t>(C::block_bytes(g)));
        BOOST_TEST(s[1] == L::strides(g)[1]);
    };
    check(vmmpp::layer_major{}, geom);
    check(vmmpp::layer_major_hnd{}, geom);
    check(vmmpp::block_major{}, geom);
    check(vmmpp::packed_kv{}, geom);
    vmmpp::kv_geometry latent = geom;
    latent.kv_heads = 1;
    latent.head_dim = 576;
    check(vmmpp::mla{}, latent);
}

BOOST_FIXTURE_TEST_SUITE(staged_copies_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(scattered_pieces_land_in_whole_host_blocks_and_come_back_in_place) {
    rig r;
    constexpr std::size_t n = 100;  // two chunks of 64 blocks
    const auto gpu_blocks = every_other(r.gpu, n);
    for (std::size_t i = 0; i < n; ++i) {
        fill(r.gpu, gpu_blocks[i], static_cast<std::int32_t>(i));
    }
    // Host blocks: a run of 40 adjacent ids, then every other id (runs and single blocks).
    std::vector<std::int32_t> host_blocks;
    for (std::size_t i = 0; i < 40; ++i) {
        host_blocks.push_back(r.host.take_block(nullptr));
    }
    for (std::int32_t b : every_other(r.host, n - 40)) {
        host_blocks.push_back(b);
    }
    const std::size_t launches = fakecuda::calls("cuLaunchKernel");
    const std::size_t dmas = fakecuda::calls("cuMemcpyAsync");
    vmmpp::copy_blocks(r.gpu, std::span<const std::int32_t>(gpu_blocks), r.host,
                       std::span<const std::int32_t>(host_blocks), r.stream);
    BOOST_TEST(fakecuda::calls("cuLaunchKernel") - launches == 2u);  // one per chunk
    // One DMA per run of adjacent host blocks: ids 0-40 (the first of every_other's is 40), then
    // 23 + 36 single blocks in the two chunks (piece by piece it would be 800 copies).
    BOOST_TEST(fakecuda::calls("cuMemcpyAsync") - dmas == 60u);
    for (std::size_t i = 0; i < n; ++i) {
        BOOST_TEST(wrong_on_host(r.host, host_blocks[i], static_cast<std::int32_t>(i)) == 0u, "host block " << i);
    }
    // Back into other GPU blocks, in another order.
    const auto landing = every_other(r.gpu, n);
    std::vector<std::int32_t> from(host_blocks.rbegin(), host_blocks.rend());
    vmmpp::copy_blocks(r.host, std::span<const std::int32_t>(from), r.gpu, std::span<const std::int32_t>(landing),
                       r.stream);
    for (std::size_t i = 0; i < n; ++i) {
        BOOST_TEST(wrong_on_gpu(r.gpu, landing[i], static_cast<std::int32_t>(n - 1 - i)) == 0u, "GPU block " << i);
    }
    BOOST_TEST(fakecuda::async_bytes() == 0u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(the_copies_and_the_scratch_follow_the_stream) {
    rig r;
    constexpr std::size_t n = 100;  // chunk 0 on the caller's stream, chunk 1 on a second one
    const auto gpu_blocks = every_other(r.gpu, n);
    std::vector<std::int32_t> host_blocks;
    for (std::size_t i = 0; i < n; ++i) {
        host_blocks.push_back(r.host.take_block(nullptr));
        fill(r.gpu, gpu_blocks[i], static_cast<std::int32_t>(10 + i));
    }
    fakecuda::hold_gpu(true);
    vmmpp::copy_blocks(r.gpu, std::span<const std::int32_t>(gpu_blocks), r.host,
                       std::span<const std::int32_t>(host_blocks), r.stream);
    BOOST_TEST(fakecuda::async_bytes() == 2 * 64 * block_bytes);  // a buffer per stream, until the free
    BOOST_TEST(wrong_on_host(r.host, host_blocks[0], 10) > 0u);   // queued, not run
    fakecuda::run_stream(r.stream);  // the caller's stream alone: its chunk, then it waits for the second
    BOOST_TEST(wrong_on_host(r.host, host_blocks[0], 10) == 0u);
    BOOST_TEST(wrong_on_host(r.host, host_blocks[63], 73) == 0u);
    BOOST_TEST(wrong_on_host(r.host, host_blocks[64], 74) > 0u);
    BOOST_TEST(fakecuda::async_bytes() > 0u);  // freed only after the second stream's copies
    fakecuda::run_gpu();
    for (std::size_t i = 0; i < n; ++i) {
        BOOST_TEST(wrong_on_host(r.host, host_blocks[i], static_cast<std::int32_t>(10 + i)) == 0u);
    }
    BOOST_TEST(fakecuda::async_bytes() == 0u);
    fakecuda::hold_gpu(false);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(the_legacy_default_stream_copies_piece_by_piece) {
    rig r;  // no staging there: the batch API refuses that stream, so plain copies as before
    const auto gpu_blocks = every_other(r.gpu, 2);
    const std::vector<std::int32_t> host_blocks{r.host.take_block(nullptr), r.host.take_block(nullptr)};
    fill(r.gpu, gpu_blocks[0], 1);
    fill(r.gpu, gpu_blocks[1], 2);
    const std::size_t launches = fakecuda::calls("cuLaunchKernel");
    vmmpp::copy_blocks(r.gpu, std::span<const std::int32_t>(gpu_blocks), r.host,
                       std::span<const std::int32_t>(host_blocks), nullptr);
    BOOST_TEST(fakecuda::calls("cuLaunchKernel") == launches);
    BOOST_TEST(wrong_on_host(r.host, host_blocks[0], 1) == 0u);
    BOOST_TEST(wrong_on_host(r.host, host_blocks[1], 2) == 0u);
}

BOOST_AUTO_TEST_CASE(packed_kv_blocks_go_through_the_staging_kernel_too) {
    // packed_kv: a piece per layer (K|V rows, 8 KiB here), 4 a block.
    using packed_gpu_t = vmmpp::kv_cache<vmmpp::elastic_page_config, vmmpp::packed_kv>;
    using packed_host_t = vmmpp::kv_cache<vmmpp::pinned_host_config, vmmpp::blocks_contiguous<vmmpp::packed_kv>>;
    vmmpp::budget budget{budget_bytes};
    packed_gpu_t gpu{geom, {}, {}, budget.register_model("kv", budget_bytes)};
    packed_host_t host{geom, host_pages};
    fakecuda::stream s;
    constexpr std::size_t n = 70;
    const auto gpu_blocks = every_other(gpu, n);
    std::vector<std::int32_t> host_blocks;
    for (std::size_t i = 0; i < n; ++i) {
        host_blocks.push_back(host.take_block(nullptr));
        fill(gpu, gpu_blocks[i], static_cast<std::int32_t>(100 + i));
    }
    const std::size_t launches = fakecuda::calls("cuLaunchKernel");
    vmmpp::copy_blocks(gpu, std::span<const std::int32_t>(gpu_blocks), host, std::span<const std::int32_t>(host_blocks), s);
    BOOST_TEST(fakecuda::calls("cuLaunchKernel") - launches == 2u);  // 64 + 6 blocks
    for (std::size_t i = 0; i < n; ++i) {
        BOOST_TEST(wrong(host, host_blocks[i], static_cast<std::int32_t>(100 + i)) == 0u, "host block " << i);
    }
    const auto landing = every_other(gpu, n);
    vmmpp::copy_blocks(host, std::span<const std::int32_t>(host_blocks), gpu, std::span<const std::int32_t>(landing), s);
    for (std::size_t i = 0; i < n; ++i) {
        BOOST_TEST(wrong(gpu, landing[i], static_cast<std::int32_t>(100 + i)) == 0u, "GPU block " << i);
    }
    BOOST_TEST(fakecuda::async_bytes() == 0u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(with_no_device_memory_for_staging_the_copy_goes_piece_by_piece) {
    rig r;
    const auto gpu_blocks = every_other(r.gpu, 2);
    const std::vector<std::int32_t> host_blocks{r.host.take_block(nullptr), r.host.take_block(nullptr)};
    fill(r.gpu, gpu_blocks[0], 3);
    fill(r.gpu, gpu_blocks[1], 4);
    fakecuda::fail("cuMemAllocFromPoolAsync", 1, CUDA_ERROR_OUT_OF_MEMORY);
    const std::size_t launches = fakecuda::calls("cuLaunchKernel");
    const std::size_t dmas = fakecuda::calls("cuMemcpyAsync");
    vmmpp::copy_blocks(r.gpu, std::span<const std::int32_t>(gpu_blocks), r.host,
                       std::span<const std::int32_t>(host_blocks), r.stream);
    BOOST_TEST(fakecuda::calls("cuLaunchKernel") == launches);
    BOOST_TEST(fakecuda::calls("cuMemcpyAsync") - dmas == 2 * rows);  // every piece on its own
    BOOST_TEST(wrong_on_host(r.host, host_blocks[0], 3) == 0u);
    BOOST_TEST(wrong_on_host(r.host, host_blocks[1], 4) == 0u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(a_layer_major_host_tier_spills_and_loads_through_the_staging_kernel) {
    vmmpp::budget budget{budget_bytes};
    gpu_t gpu{geom, {}, {}, budget.register_model("kv", budget_bytes)};
    vmmpp::prefix_cache<gpu_t> prefix{gpu};
    fakecuda::stream s;
    vmmpp::host_tier<vmmpp::prefix_cache<gpu_t>> tier{prefix, {.max_blocks = 8, .stream = s}, host_pages};
    std::vector<std::int32_t> tokens(5 * geom.block_tokens);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = static_cast<std::int32_t>(i + 1);
    }
    const auto t = tier.attach(tokens, {});
    prefix.append(t.seq, tokens.size());
    const auto table = gpu.block_table(t.seq);
    for (std::size_t i = 0; i < table.size(); ++i) {
        fill(gpu, table[i], static_cast<std::int32_t>(40 + i));
    }
    prefix.publish(t.seq, tokens);
    prefix.free(t.seq);
    const std::size_t launches = fakecuda::calls("cuLaunchKernel");
    (void)prefix.clear();  // spilled: gathered to the host
    BOOST_TEST(tier.stats().offloaded_blocks == 5u);
    BOOST_TEST(fakecuda::calls("cuLaunchKernel") > launches);
    const auto back = tier.attach(tokens, {});
    BOOST_TEST(back.host_tokens == tokens.size());
    tier.synchronize();
    const auto loaded = gpu.block_table(back.seq);
    for (std::size_t i = 0; i < loaded.size(); ++i) {
        BOOST_TEST(wrong_on_gpu(gpu, loaded[i], static_cast<std::int32_t>(40 + i)) == 0u, "block " << i);
    }
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_SUITE_END()
