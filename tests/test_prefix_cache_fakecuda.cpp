// prefix_cache on the fake driver (support/fakecuda; CI runs it for real): a cached block evicted
// right after its sequence was freed on a stream whose reads are still queued keeps its memory
// until that stream ran, whatever stream the eviction itself names: the fence free left on the
// block stays with it (kv_cache::release_block drops the prefix cache's reference in stream order);
// and compaction's move of a cached block into a freed id, on another stream than the engine's,
// waits for the engine's last write of the block and last read of the id, and unmaps the old
// page only after the copy; a request attaching the moved block on a third stream reads it after
// the copy.
#define BOOST_TEST_MODULE prefix cache on the fake driver
#include "support/cpu_main.hpp"

#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::queued_reads;

namespace {

// 8 layers, 2 heads of 64, fp16, 16 tokens: a K or V piece is 4 KiB, a block_major block 64 KiB,
// exactly one page of the fake (granularity 64 KiB): a block's last reference takes its page.
constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 64};
constexpr std::size_t piece = 16 * 2 * 64 * 2;
constexpr std::size_t budget_bytes = std::size_t{16} << 20;
using cache_t = vmmpp::kv_cache<vmmpp::elastic_page_config, vmmpp::block_major>;

// 2 layers: a block_major block of 16 KiB, 4 blocks a fake page.
constexpr vmmpp::kv_geometry small_geom{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                        .block_tokens = 16, .max_blocks = 64};

/// Queues on `stream` a write of `value` into every K and V piece of `block`.
void write_block(const cache_t& c, std::int32_t block, unsigned char value, CUstream stream) {
    vmmpp_test::queue_block_write(c, block, value, piece, stream);
}

/// A sequence of `blocks` new blocks through the prefix cache, each filled with `value`.
vmmpp::seq_id filled(vmmpp::prefix_cache<cache_t>& pc, const std::vector<std::int32_t>& tokens, unsigned char value) {
    const auto [s, cached] = pc.attach(tokens);
    pc.append(s, tokens.size() - cached);
    for (std::int32_t b : pc.cache().block_table(s)) {
        vmmpp_test::fill_block_pieces(pc.cache(), b, value, piece);
    }
    return s;
}

void fill_block(cache_t& c, std::int32_t b, unsigned char value) {
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        std::memset(c.key(l, b), value, piece);
        std::memset(c.value(l, b), value, piece);
    }
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(prefix_cache_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(evict_right_after_free_waits_for_the_freeing_stream) {
    vmmpp::budget budget{budget_bytes};
    cache_t c{geom, {}, {}, budget.register_model("kv", budget_bytes)};
    vmmpp::prefix_cache<cache_t> pc(c);
    fakecuda::stream engine;  // non-blocking: not ordered with the legacy stream the eviction uses

    std::vector<std::int32_t> tokens(16);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = static_cast<std::int32_t>(i + 3);
    }
    const auto [s, cached] = pc.attach(tokens);
    BOOST_TEST(cached == 0u);
    pc.append(s, tokens.size());
    const std::int32_t block = c.block_table(s)[0];
    fill_block(c, block, 0x5a);
    BOOST_TEST(pc.publish(s, tokens) == 1u);

    fakecuda::hold_gpu(true);
    queued_reads reads(engine);
    reads.read_block(c, block, piece);  // the engine's last step still reads the block
    const std::size_t mapped = fakecuda::mapped_bytes();
    c.free(s, engine);
    BOOST_TEST(pc.evictable(block));
    const auto r = pc.evict(1);  // right after the free, on the cache's own (legacy) stream
    BOOST_TEST(r.blocks.size() == 1u);
    BOOST_TEST(c.block_refs(block) == 0u);
    BOOST_TEST(r.freed_page_bytes == c.pool().page_bytes());  // the page holds no block any more...
    (void)c.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // ...but is not unmapped under the queued reads
    BOOST_TEST(c.pool().stats().awaiting_gpu_units == 1u);

    fakecuda::run_stream(nullptr);  // the eviction's own stream is done: the engine's is not
    (void)c.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(c.pool().stats().awaiting_gpu_units == 1u);

    fakecuda::hold_gpu(false);  // the engine's reads run
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x5a) == 0u);
    (void)c.collect();
    BOOST_TEST(c.pool().stats().awaiting_gpu_units == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);  // and now the page went back
    BOOST_TEST(pc.lookup(tokens) == 0u);
}

BOOST_AUTO_TEST_CASE(compaction_moves_after_the_engines_last_write_and_read) {
    vmmpp::budget budget{budget_bytes};
    cache_t c{small_geom, {}, {}, budget.register_model("kv", budget_bytes)};
    vmmpp::prefix_cache<cache_t> pc(c);
    fakecuda::stream reader, engine;  // non-blocking: not ordered with the legacy stream compact uses
    auto tokens = [](std::size_t n, std::int32_t first) {
        std::vector<std::int32_t> t(n);
        for (std::size_t i = 0; i < n; ++i) {
            t[i] = first + static_cast<std::int32_t>(i);
        }
        return t;
    };
    const auto pinned = filled(pc, tokens(16, 0), 0x01);       // block 0, live: page 0 stays
    const auto hole = filled(pc, tokens(16, 100), 0x44);       // block 1: freed, its reads queued
    const auto padding = filled(pc, tokens(32, 200), 0x02);    // blocks 2, 3, live
    const auto moving = filled(pc, tokens(16, 300), 0x22);     // block 4, alone on page 1: cached
    BOOST_TEST_REQUIRE(c.block_table(hole)[0] == 1);
    BOOST_TEST_REQUIRE(c.block_table(moving)[0] == 4);
    BOOST_TEST(pc.publish(moving, tokens(16, 300)) == 1u);

    fakecuda::hold_gpu(true);
    queued_reads reads(reader);
    reads.read_block(c, 1, piece);  // one request's last step reads block 1
    c.free(hole, reader);
    write_block(c, 4, 0x33, engine);  // another's writes block 4's last tokens
    c.free(moving, engine);
    const std::size_t mapped = fakecuda::mapped_bytes();

    const auto r = pc.compact();  // on the cache's own (legacy) stream
    BOOST_TEST(r.moved_blocks == 1u);
    BOOST_TEST(r.freed_page_bytes == c.pool().page_bytes());
    BOOST_TEST(*pc.block_of(*pc.key_of(1)) == 1);  // the key follows its block to id 1
    BOOST_TEST(!pc.key_of(4).has_value());
    BOOST_TEST(c.block_refs(4) == 0u);
    (void)c.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // page 1 stays mapped under the queued copy

    fakecuda::run_stream(nullptr);  // the copy's stream alone: it waits for both
    BOOST_TEST(vmmpp_test::differing_bytes(c, 1, 0x44, piece) == 0u);  // not written under the reads
    fakecuda::run_stream(reader);  // the reads of block 1 run
    BOOST_TEST(reads.differing(0x44) == 0u);
    fakecuda::run_stream(nullptr);  // the copy still waits for the engine's write of its source
    (void)c.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(vmmpp_test::differing_bytes(c, 1, 0x44, piece) == 0u);

    fakecuda::hold_gpu(false);  // the engine's write runs, then the copy
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(vmmpp_test::differing_bytes(c, 1, 0x33, piece) == 0u);  // the copy saw the engine's write
    (void)c.collect();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);  // and page 1 went back after it
    BOOST_TEST(pc.lookup(tokens(16, 300)) == 16u);
    c.free(pinned);
    c.free(padding);
}


BOOST_AUTO_TEST_CASE(an_attach_reads_a_moved_block_only_after_its_copy_on_another_stream) {
    vmmpp::budget budget{budget_bytes};
    cache_t c{small_geom, {}, {}, budget.register_model("kv", budget_bytes)};
    vmmpp::prefix_cache<cache_t> pc(c);
    fakecuda::stream mover, reader;  // non-blocking, not ordered with each other
    auto tokens = [](std::size_t n, std::int32_t first) {
        std::vector<std::int32_t> t(n);
        for (std::size_t i = 0; i < n; ++i) {
            t[i] = first + static_cast<std::int32_t>(i);
        }
        return t;
    };
    const auto pinned = filled(pc, tokens(16, 0), 0x01);     // block 0, live
    const auto hole = filled(pc, tokens(16, 100), 0x44);     // block 1: freed, not cached
    const auto padding = filled(pc, tokens(32, 200), 0x02);  // blocks 2, 3, live
    const auto moving = filled(pc, tokens(16, 300), 0x22);   // block 4, alone on page 1: cached
    BOOST_TEST(pc.publish(moving, tokens(16, 300)) == 1u);
    c.free(hole);
    c.free(moving);

    fakecuda::hold_gpu(true);
    BOOST_TEST(pc.compact(mover).moved_blocks == 1u);  // block 4's bytes to id 1, queued on `mover`
    const auto [seq, cached] = pc.attach(tokens(16, 300), {}, reader);
    BOOST_TEST(cached == 16u);
    BOOST_TEST_REQUIRE(c.block_table(seq)[0] == 1);
    queued_reads reads(reader);
    reads.read_block(c, 1, piece);  // the new request reads its cached prefix on its own stream
    fakecuda::run_stream(reader);   // the reader alone: its read waits for the copy
    BOOST_TEST(reads.differing(0) == 0u);  // nothing read yet (not block 1's old 0x44)
    fakecuda::hold_gpu(false);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x22) == 0u);  // the moved block's bytes
    c.free(seq);
    c.free(pinned);
    c.free(padding);
}

BOOST_AUTO_TEST_SUITE_END()
