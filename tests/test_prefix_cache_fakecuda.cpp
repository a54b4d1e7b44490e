// prefix_cache on the fake driver (support/fakecuda; CI runs it for real): a cached block evicted
// right after its sequence was freed on a stream whose reads are still queued keeps its memory
// until that stream ran, whatever stream the eviction itself names: the fence free left on the
// block stays with it (kv_cache::release_block drops the prefix cache's reference in stream order).
#define BOOST_TEST_MODULE prefix cache on the fake driver
#include "support/cpu_main.hpp"

#include <cstring>
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

BOOST_AUTO_TEST_SUITE_END()
