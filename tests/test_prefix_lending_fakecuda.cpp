// prefix_lending on the fake driver (support/fakecuda; CI runs it for real): a lent block whose
// sequence was freed on a stream with reads still queued is evicted at once, but its page goes
// back only after that stream ran. The refused model sees over_quota meanwhile (the lender's
// cache already lost the block), and its retry after the stream ran gets the page.
#define BOOST_TEST_MODULE prefix lending on the fake driver
#include "support/cpu_main.hpp"

#include <cstring>
#include <vector>

#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/prefix/lending.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::queued_reads;

namespace {

// 8 layers, 2 heads of 64, fp16, 16 tokens: a K or V piece is 4 KiB, a block_major block 64 KiB,
// exactly one page of the fake (granularity 64 KiB).
constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 64};
constexpr std::size_t piece = 16 * 2 * 64 * 2;
constexpr std::size_t page = std::size_t{64} << 10;
using cache_t = vmmpp::kv_cache<vmmpp::elastic_page_config, vmmpp::block_major>;
using prefix_t = vmmpp::prefix_cache<cache_t>;

void fill_block(cache_t& c, std::int32_t b, unsigned char value) {
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        std::memset(c.key(l, b), value, piece);
        std::memset(c.value(l, b), value, piece);
    }
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(prefix_lending_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(a_lent_page_under_queued_reads_comes_back_after_them) {
    vmmpp::budget budget{2 * page};
    cache_t a{geom, {}, {}, budget.register_model("a", 2 * page)};
    cache_t b{geom, {}, {}, budget.register_model("b", 2 * page)};
    prefix_t pa(a);
    vmmpp::prefix_lending<prefix_t> lend(pa);
    fakecuda::stream engine;

    std::vector<std::int32_t> tokens(16);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = static_cast<std::int32_t>(i + 7);
    }
    const auto s = a.add_sequence();
    pa.append(s, tokens.size());
    const std::int32_t block = a.block_table(s)[0];
    fill_block(a, block, 0x3c);
    pa.publish(s, tokens);
    fakecuda::hold_gpu(true);
    queued_reads reads(engine);
    reads.read_block(a, block, piece);  // A's last step still reads the block
    a.free(s, engine);                  // cached, evictable, fenced
    BOOST_TEST(pa.evictable(block));

    const auto sb = b.add_sequence();
    b.append(sb, 16);  // the other page of the budget
    BOOST_CHECK_THROW(b.append(sb, 16), vmmpp::over_quota);  // A's page is under the queued reads
    BOOST_TEST(lend.stats().lent_blocks == 1u);  // evicted at once...
    BOOST_TEST(pa.lookup(tokens) == 0u);
    BOOST_TEST(a.pool().stats().awaiting_gpu_units == 1u);  // ...its page kept for the reads
    BOOST_TEST(budget.stats().committed == 2 * page);

    fakecuda::hold_gpu(false);  // the reads run
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
    BOOST_TEST(reads.differing(0x3c) == 0u);  // they read what A wrote, not B's data
    BOOST_CHECK_NO_THROW(b.append(sb, 16));   // the retry: A's pool gives the page back
    BOOST_TEST(b.tokens(sb) == 32u);
    BOOST_TEST(a.pool().committed_bytes() == 0u);
    BOOST_TEST(budget.stats().committed == 2 * page);
}

BOOST_AUTO_TEST_SUITE_END()
