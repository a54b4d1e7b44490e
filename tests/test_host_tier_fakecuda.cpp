// host_tier on the fake driver (support/fakecuda; CI runs it for real): evicted cached blocks are
// copied to page-locked host blocks after the engine's last write of them, and their GPU memory
// goes back only after the copy; a prefix found in the host tier comes back into fresh GPU blocks
// that the engine's stream reads only after the copy; a sequence swapped out and in keeps every
// token; a full tier refuses a swap and changes nothing; and a randomized engine on two streams,
// with the GPU held and run in pieces, against a model of every block's bytes.
#define BOOST_TEST_MODULE host tier on the fake driver
#include "support/cpu_main.hpp"

#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/tier/host_tier.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::differing_bytes;
using vmmpp_test::fill_block_pieces;
using vmmpp_test::queued_reads;

namespace {

// 8 layers, 2 heads of 64, fp16, 16 tokens: a K or V piece is 4 KiB, a block_major block 64 KiB,
// one page of the fake (granularity 64 KiB): a block's last reference takes its page.
constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 16};
constexpr std::size_t piece = 16 * 2 * 64 * 2;
constexpr std::size_t block_bytes = piece * 2 * 8;
constexpr std::size_t budget_bytes = std::size_t{16} << 20;
using cache_t = vmmpp::kv_cache<vmmpp::elastic_page_config, vmmpp::block_major>;
using prefix_t = vmmpp::prefix_cache<cache_t>;
using tier_t = vmmpp::host_tier<prefix_t>;
constexpr vmmpp::pinned_host_options host_pages{.page_bytes = std::size_t{64} << 10};

/// A prompt of `blocks` full blocks, token ids from `first` on.
std::vector<std::int32_t> prompt(std::size_t blocks, std::int32_t first) {
    std::vector<std::int32_t> t(blocks * geom.block_tokens);
    for (std::size_t i = 0; i < t.size(); ++i) {
        t[i] = first + static_cast<std::int32_t>(i);
    }
    return t;
}

/// Queues on `stream` a write of `value` into every K and V piece of `block`.
void write_block(const cache_t& c, std::int32_t block, unsigned char value, CUstream stream) {
    vmmpp_test::queue_block_write(c, block, value, piece, stream);
}

struct rig {
    vmmpp::budget budget{budget_bytes};
    cache_t gpu{geom, {}, {}, budget.register_model("kv", budget_bytes)};
    prefix_t prefix{gpu};
    fakecuda::stream tier_stream;
    tier_t tier;
    explicit rig(std::size_t host_blocks) : tier(prefix, {.max_blocks = host_blocks, .stream = tier_stream}, host_pages) {}

    /// A sequence holding `tokens` (attached where cached), its new blocks filled with `value`
    /// at once, published.
    vmmpp::seq_id written(const std::vector<std::int32_t>& tokens, unsigned char value) {
        const auto t = tier.attach(tokens, {});
        prefix.append(t.seq, tokens.size() - t.cached_tokens);
        const auto table = gpu.block_table(t.seq);
        for (std::size_t i = t.cached_tokens / geom.block_tokens; i < table.size(); ++i) {
            fill_block_pieces(gpu, table[i], value, piece);
        }
        prefix.publish(t.seq, tokens);
        return t.seq;
    }
};

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(host_tier_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(the_host_memory_is_page_locked_once_and_unlocked_with_the_tier) {
    const std::size_t before = fakecuda::registered_host_bytes();
    {
        rig r(8);
        const std::size_t committed = r.tier.host_cache().pool().committed_bytes();  // the span, 2 MiB-aligned
        BOOST_TEST(committed >= 8 * block_bytes);
        BOOST_TEST(fakecuda::registered_host_bytes() - before == committed);
        BOOST_TEST(fakecuda::calls("cuMemHostRegister") >= 1u);
    }
    BOOST_TEST(fakecuda::registered_host_bytes() == before);
}

BOOST_AUTO_TEST_CASE(a_tier_needs_blocks_and_a_stream_of_its_own) {
    vmmpp::budget budget{budget_bytes};
    cache_t gpu{geom, {}, {}, budget.register_model("kv", budget_bytes)};
    prefix_t prefix{gpu};
    fakecuda::stream s;
    BOOST_CHECK_THROW(tier_t(prefix, {.max_blocks = 0, .stream = s}, host_pages), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(tier_t(prefix, {.max_blocks = 4, .stream = nullptr}, host_pages), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(evicted_blocks_go_to_the_host_and_come_back_on_a_hit) {
    rig r(8);
    const auto tokens = prompt(3, 100);
    const vmmpp::seq_id s = r.written(tokens, 0x31);
    r.prefix.free(s);
    const auto evicted = r.prefix.clear();
    BOOST_TEST(evicted.blocks.size() == 3u);
    BOOST_TEST(r.tier.stats().offloaded_blocks == 3u);
    BOOST_TEST(r.tier.stats().keyed_blocks == 3u);
    (void)r.gpu.collect();
    BOOST_TEST(r.gpu.pool().committed_bytes() == 0u);  // the GPU memory went back after the copies

    const auto found = r.tier.lookup(tokens);
    BOOST_TEST(found.gpu_tokens == 0u);
    BOOST_TEST(found.host_tokens == 48u);
    const auto t = r.tier.attach(tokens, {});
    BOOST_TEST(t.cached_tokens == 48u);
    BOOST_TEST(t.host_tokens == 48u);
    r.tier.synchronize();
    for (std::int32_t b : r.gpu.block_table(t.seq)) {
        BOOST_TEST(differing_bytes(r.gpu, b, 0x31, piece) == 0u);
    }
    BOOST_TEST(r.prefix.lookup(tokens) == 48u);  // published on the GPU again
    BOOST_TEST(r.tier.stats().host_hits == 3u);
    BOOST_TEST(r.tier.stats().bytes_to_device == 3 * block_bytes);
    BOOST_TEST(fakecuda::calls("cuMemcpyAsync") > 0u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(a_prefix_continues_from_the_gpu_into_the_host_tier) {
    rig r(8);
    const auto tokens = prompt(4, 7);
    const vmmpp::seq_id s = r.written(tokens, 0x52);
    r.prefix.free(s);
    (void)r.prefix.evict(2);  // the tail goes first (LRU order puts a prompt's head newest)
    const auto found = r.tier.lookup(tokens);
    BOOST_TEST(found.gpu_tokens == 32u);
    BOOST_TEST(found.host_tokens == 32u);
    const auto t = r.tier.attach(tokens, {});
    BOOST_TEST(t.cached_tokens == 64u);
    BOOST_TEST(t.host_tokens == 32u);
    r.tier.synchronize();
    for (std::int32_t b : r.gpu.block_table(t.seq)) {
        BOOST_TEST(differing_bytes(r.gpu, b, 0x52, piece) == 0u);
    }
}

BOOST_AUTO_TEST_CASE(an_evicted_block_is_copied_after_the_engine_write_and_its_memory_waits_for_the_copy) {
    rig r(8);
    fakecuda::stream engine;
    const auto tokens = prompt(1, 500);
    const auto t = r.tier.attach(tokens, {}, engine);
    r.prefix.append(t.seq, tokens.size(), engine);
    const std::int32_t block = r.gpu.block_table(t.seq)[0];
    r.prefix.publish(t.seq, tokens);

    fakecuda::hold_gpu(true);
    write_block(r.gpu, block, 0x77, engine);  // the engine's last step still writes the block
    const std::size_t mapped = fakecuda::mapped_bytes();
    r.prefix.free(t.seq, engine);
    BOOST_TEST(r.prefix.evict(1).blocks.size() == 1u);
    BOOST_TEST(r.gpu.block_refs(block) == 0u);
    (void)r.gpu.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // not unmapped under the write or the copy

    fakecuda::run_stream(r.tier_stream);  // the copy waits for the engine's write: nothing runs
    BOOST_TEST(fakecuda::queued_on(r.tier_stream) > 0u);
    fakecuda::run_stream(engine);  // the write
    (void)r.gpu.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // the copy has not run yet
    fakecuda::hold_gpu(false);
    (void)r.gpu.collect();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);  // now the page went back

    const auto back = r.tier.attach(tokens, {});
    r.tier.synchronize();
    BOOST_TEST(back.host_tokens == 16u);
    BOOST_TEST(differing_bytes(r.gpu, r.gpu.block_table(back.seq)[0], 0x77, piece) == 0u);  // the written bytes
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(a_loaded_block_is_read_on_the_engine_stream_only_after_the_copy) {
    rig r(8);
    fakecuda::stream engine;
    const auto tokens = prompt(2, 900);
    r.prefix.free(r.written(tokens, 0x19));
    (void)r.prefix.clear();
    r.tier.synchronize();

    fakecuda::hold_gpu(true);
    const auto t = r.tier.attach(tokens, {}, engine);
    BOOST_TEST(t.host_tokens == 32u);
    queued_reads reads(engine);
    for (std::int32_t b : r.gpu.block_table(t.seq)) {
        reads.read_block(r.gpu, b, piece);
    }
    fakecuda::run_stream(engine);  // the reads wait for the tier's copies
    BOOST_TEST(fakecuda::queued_on(engine) > 0u);
    fakecuda::hold_gpu(false);
    BOOST_TEST(reads.differing(0x19) == 0u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(blocks_stored_ahead_are_evicted_without_a_copy_and_their_memory_waits_for_the_store) {
    rig r(8);
    fakecuda::stream engine;
    const auto tokens = prompt(3, 4000);
    const auto t = r.tier.attach(tokens, {}, engine);
    r.prefix.append(t.seq, tokens.size(), engine);
    const std::vector<std::int32_t> blocks(r.gpu.block_table(t.seq).begin(), r.gpu.block_table(t.seq).end());
    r.prefix.publish(t.seq, tokens);
    fakecuda::hold_gpu(true);
    for (std::int32_t b : blocks) {
        write_block(r.gpu, b, 0x2c, engine);
    }
    r.prefix.free(t.seq, engine);
    BOOST_TEST(r.tier.store_ahead(2) == 2u);  // the two next to be evicted: the prompt's tail
    BOOST_TEST(r.tier.store_ahead(8) == 1u);  // the rest
    BOOST_TEST(r.tier.store_ahead(8) == 0u);  // nothing left to store
    BOOST_TEST(r.tier.stats().stored_ahead_blocks == 3u);
    const std::size_t copies = fakecuda::calls("cuMemcpyAsync");
    const std::size_t mapped = fakecuda::mapped_bytes();
    BOOST_TEST(r.prefix.clear().blocks.size() == 3u);
    BOOST_TEST(fakecuda::calls("cuMemcpyAsync") == copies);  // evicted without a copy
    BOOST_TEST(r.tier.stats().offloaded_blocks == 0u);
    (void)r.gpu.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // the stores ahead have not run
    fakecuda::run_stream(engine);  // the writes: the stores ahead are still queued
    fakecuda::run_stream(nullptr);
    (void)r.gpu.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    fakecuda::hold_gpu(false);
    (void)r.gpu.collect();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);
    const auto back = r.tier.attach(tokens, {});
    r.tier.synchronize();
    BOOST_TEST(back.host_tokens == 48u);
    for (std::int32_t b : r.gpu.block_table(back.seq)) {
        BOOST_TEST(differing_bytes(r.gpu, b, 0x2c, piece) == 0u);
    }
}

BOOST_AUTO_TEST_CASE(a_swapped_sequence_comes_back_with_every_token) {
    rig r(8);
    fakecuda::stream engine;
    const vmmpp::seq_id s = r.gpu.add_sequence();
    r.prefix.append(s, 56, engine);  // 3.5 blocks
    const std::vector<std::int32_t> before(r.gpu.block_table(s).begin(), r.gpu.block_table(s).end());
    fakecuda::hold_gpu(true);
    for (std::size_t i = 0; i < before.size(); ++i) {
        write_block(r.gpu, before[i], static_cast<unsigned char>(0x60 + i), engine);
    }
    const std::uint64_t id = r.tier.swap_out(s, engine);
    BOOST_TEST(!r.gpu.contains(s));
    BOOST_TEST(r.tier.swapped_tokens(id) == 56u);
    BOOST_TEST(r.tier.stats().swapped_blocks == 4u);
    fakecuda::hold_gpu(false);
    (void)r.gpu.collect();
    BOOST_TEST(r.gpu.pool().committed_bytes() == 0u);

    const vmmpp::seq_id back = r.tier.swap_in(id, engine);
    r.tier.synchronize();
    BOOST_TEST(r.gpu.tokens(back) == 56u);
    const auto table = r.gpu.block_table(back);
    BOOST_TEST(table.size() == 4u);
    for (std::size_t i = 0; i < table.size(); ++i) {
        BOOST_TEST(differing_bytes(r.gpu, table[i], static_cast<unsigned char>(0x60 + i), piece) == 0u);
    }
    BOOST_TEST(r.tier.stats().swapped_blocks == 0u);
    BOOST_TEST(r.tier.stats().free_blocks == 8u);
    BOOST_CHECK_THROW((void)r.tier.swap_in(id, engine), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(a_full_tier_refuses_a_swap_and_changes_nothing) {
    rig r(2);
    const vmmpp::seq_id s = r.gpu.add_sequence();
    r.prefix.append(s, 48);
    const auto stats = r.tier.stats();
    try {
        (void)r.tier.swap_out(s, nullptr);
        BOOST_FAIL("swap_out of 3 blocks into 2 did not throw");
    } catch (const vmmpp::tier_full& e) {
        BOOST_TEST(e.needed() == 3u);
        BOOST_TEST(e.free() == 2u);
        BOOST_TEST(e.max_blocks() == 2u);
        BOOST_TEST(std::string(e.what()).find("3 host blocks needed, 2 free") != std::string::npos);
    }
    BOOST_TEST(r.gpu.contains(s));
    BOOST_TEST(r.gpu.tokens(s) == 48u);
    BOOST_TEST(r.tier.stats().free_blocks == stats.free_blocks);
}

BOOST_AUTO_TEST_CASE(a_full_tier_keeps_the_newest_victims_and_gives_up_its_oldest) {
    rig r(2);
    const auto a = prompt(2, 1000), b = prompt(2, 2000);
    r.prefix.free(r.written(a, 0x0a));
    (void)r.prefix.clear();
    BOOST_TEST(r.tier.lookup(a).host_tokens == 32u);
    r.prefix.free(r.written(b, 0x0b));
    (void)r.prefix.clear();  // a's host blocks give way to b's
    BOOST_TEST(r.tier.lookup(a).host_tokens == 0u);
    BOOST_TEST(r.tier.lookup(b).host_tokens == 32u);
    BOOST_TEST(r.tier.stats().evicted_blocks == 2u);
}

BOOST_AUTO_TEST_SUITE_END()
