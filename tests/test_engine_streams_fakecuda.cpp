// An engine's streams on the fake driver (support/fakecuda): the randomized engine of
// support/engine_sim.hpp (admit, decode, fork, truncate, free on three engine streams and a
// separate cache stream; writes through slot_mapping, reads through block tables), with the
// fake's streams run in random order and some held back for a while, as a GPU may. No read may
// see another value than the model's, and no copy may meet unmapped memory (the fake then fails
// every call with CUDA_ERROR_ILLEGAL_ADDRESS, as a GPU loses the context).
#define BOOST_TEST_MODULE engine streams on the fake driver
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <random>
#include <vector>

#include "support/engine_sim.hpp"
#include "support/fakecuda.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;

namespace {

template <class Config, class Layout>
struct kv_case {
    using cache = vmmpp::kv_cache<Config, Layout>;
};
using vmm_chunked4_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<4>, vmmpp::shared_budget>;
using kv_cases = boost::mpl::list<kv_case<vmmpp::elastic_page_config, vmmpp::block_major>,
                                  kv_case<vmmpp::elastic_page_config, vmmpp::layer_major>,
                                  kv_case<vmmpp::elastic_config, vmmpp::block_major>,
                                  kv_case<vmmpp::elastic_config, vmmpp::layer_major_hnd>,
                                  kv_case<vmm_chunked4_config, vmmpp::block_major>>;

// 2 layers, 2 heads of 64, fp16, 16 tokens: a block_major block is 16 KiB, four to a fake page.
constexpr vmmpp::kv_geometry geom{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 512};
constexpr std::size_t budget_bytes = std::size_t{256} << 20;

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(engine_streams_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE_TEMPLATE(random_engine_on_several_streams_matches_the_model, Case, kv_cases) {
    for (std::uint64_t seed = 1; seed <= 12; ++seed) {
        fakecuda::stream e0, e1, e2, cache_stream;
        const std::vector<CUstream> all{e0, e1, e2, cache_stream};
        {
            vmmpp::budget budget(budget_bytes);
            typename Case::cache cache(geom, {}, {}, budget.register_model("kv", budget_bytes),
                                       {.stream = cache_stream});
            fakecuda::hold_gpu(true);
            vmmpp_test::engine_sim<typename Case::cache> engine(
                cache, {e0, e1, e2}, cache_stream, seed, [&](std::mt19937_64& rng) {
                    // The GPU: a random stream gets ahead now and then; once in a while all catch up.
                    const int r = std::uniform_int_distribution<int>(0, 99)(rng);
                    if (r < 40) {
                        fakecuda::run_stream(all[std::uniform_int_distribution<std::size_t>(0, all.size() - 1)(rng)]);
                    } else if (r < 44) {
                        fakecuda::run_gpu();
                    }
                },
                vmmpp_test::engine_sim<typename Case::cache>::plain_host);
            engine.run(250);
            fakecuda::hold_gpu(false);  // the GPU finishes everything
            BOOST_TEST_REQUIRE(fakecuda::sticky_error() == CUDA_SUCCESS, "seed " << seed << ": a copy met unmapped memory");
            const auto r = engine.check();
            BOOST_TEST(r.mismatches == 0u, "seed " << seed << ": " << r.mismatches << " of " << r.reads
                                                   << " reads wrong; first: " << r.first_mismatch);
            BOOST_TEST(r.forks > 0u);
            BOOST_TEST(r.reads > 0u);
            (void)cache.collect();
            BOOST_TEST(cache.used_blocks() == 0u);
        }
        BOOST_TEST(fakecuda::mapped_bytes() == 0u);  // the pool gave everything back
    }
}

BOOST_AUTO_TEST_SUITE_END()
