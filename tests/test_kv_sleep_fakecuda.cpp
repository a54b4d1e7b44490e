// kv_cache sleep and wake on the vmm backing over the fake driver (support/fakecuda; CI runs
// these for real): the device path (cuMemcpyAsync per range, a pool fence waited for) gives
// back every mapping and handle, kept ones included, and the blocks come back byte for byte; a
// copy or a handle creation that fails in the middle of a wake leaves the cache asleep with
// nothing mapped, and a later wake succeeds.
#define BOOST_TEST_MODULE kv sleep on the fake driver
#include "support/cpu_main.hpp"

#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "support/fakecuda.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"

namespace fakecuda = vmmpp_test::fakecuda;

namespace {

template <class Config, class Layout>
struct kv_case {
    using config = Config;
    using cache = vmmpp::kv_cache<Config, Layout>;
};
// Both vmm configurations in the NHD layouts of vmmpp::kv_layouts (block_major, layer_major).
using kv_cases = vmmpp::apply_t<
    vmmpp::product_t<vmmpp::type_list<vmmpp::elastic_page_config, vmmpp::elastic_config>, vmmpp::nhd_kv_layouts, kv_case>,
    std::tuple>;

// A K or V piece is 4 KiB; a block_major block is 64 KiB, one page of the fake.
constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 256};
constexpr std::size_t piece = 16 * 2 * 64 * 2;
constexpr std::size_t budget_bytes = std::size_t{64} << 20;

template <class Case>
struct made_cache {
    vmmpp::budget budget{budget_bytes};
    typename Case::cache cache{geom, vmmpp::vmm_options{.max_cached_handles = 8}, {},
                               budget.register_model("kv", budget_bytes)};
};

/// Fills every live block's K and V through the (host-visible) fake mapping.
template <class Cache>
void fill(Cache& c) {
    for (const auto& [id, s] : c.sequence_map()) {
        for (std::int32_t b : s.blocks) {
            for (std::uint32_t l = 0; l < geom.layers; ++l) {
                std::memset(c.key(l, b), static_cast<int>(b * 3 + l + 1), piece);
                std::memset(c.value(l, b), static_cast<int>(b * 3 + l + 2), piece);
            }
        }
    }
}
/// Bytes of the live blocks that differ from fill's pattern.
template <class Cache>
std::size_t differing(const Cache& c) {
    std::size_t bad = 0;
    for (const auto& [id, s] : c.sequence_map()) {
        for (std::int32_t b : s.blocks) {
            for (std::uint32_t l = 0; l < geom.layers; ++l) {
                for (int part = 0; part < 2; ++part) {
                    const std::byte* p = part == 0 ? c.key(l, b) : c.value(l, b);
                    const auto want = static_cast<unsigned char>(b * 3 + l + 1 + part);
                    for (std::size_t i = 0; i < piece; ++i) {
                        bad += static_cast<unsigned char>(p[i]) != want;
                    }
                }
            }
        }
    }
    return bad;
}

template <class Cache>
void populate(Cache& c) {
    const auto a = c.add_sequence();
    (void)c.append(a, 100);
    const auto gone = c.add_sequence();
    (void)c.append(gone, 50);
    const auto b = c.add_sequence();
    (void)c.append(b, 37);
    c.free(gone);  // a hole of ids, and kept handles
    (void)c.fork(a);
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(kv_sleep_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE_TEMPLATE(sleep_unmaps_and_releases_everything_and_wake_restores_it, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    populate(c);
    fill(c);
    std::vector<std::byte> host(c.sleep_bytes());
    const std::size_t copies_before = fakecuda::calls("cuMemcpyAsync");
    const vmmpp::sleep_result s = c.sleep(host);
    BOOST_TEST(c.asleep());
    BOOST_TEST(fakecuda::calls("cuMemcpyAsync") - copies_before == s.ranges);
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);
    BOOST_TEST(fakecuda::live_handles() == 0u);  // kept handles too
    BOOST_TEST(made.budget.stats().committed == 0u);
    const vmmpp::sleep_result w = c.wake();
    BOOST_TEST(w.bytes_copied == s.bytes_copied);
    BOOST_TEST(fakecuda::mapped_bytes() >= s.bytes_copied);
    BOOST_TEST(differing(c) == 0u);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);  // nothing touched unmapped memory
}

BOOST_AUTO_TEST_CASE_TEMPLATE(a_failure_in_the_middle_of_a_wake_leaves_the_cache_asleep, Case, kv_cases) {
    made_cache<Case> made;
    auto& c = made.cache;
    populate(c);
    fill(c);
    std::vector<std::byte> host(c.sleep_bytes());
    const vmmpp::sleep_result s = c.sleep(host);
    BOOST_TEST(s.ranges >= 2u);  // the hole splits them
    // A handle the driver cannot create, half way (elastic_config's extents: its first and only
    // handle may hold every block, so the first one).
    constexpr int nth = std::is_same_v<typename Case::config, vmmpp::elastic_page_config> ? 2 : 1;
    fakecuda::fail("cuMemCreate", nth, CUDA_ERROR_OUT_OF_MEMORY);
    BOOST_CHECK_THROW((void)c.wake(), vmmpp::error);
    BOOST_TEST(c.asleep());
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);
    BOOST_TEST(made.budget.stats().committed == 0u);
    // The second copy fails, after every block was committed again and the first range queued.
    fakecuda::fail("cuMemcpyAsync", 2, CUDA_ERROR_INVALID_VALUE);
    BOOST_CHECK_THROW((void)c.wake(), vmmpp::cuda_error);
    BOOST_TEST(c.asleep());
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);
    BOOST_TEST(made.budget.stats().committed == 0u);
    (void)c.wake();
    BOOST_TEST(!c.asleep());
    BOOST_TEST(differing(c) == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
