// The sequence_contiguous layout (vAttention style) on host configurations, for real: each
// sequence's blocks are consecutive ids of its own slot, so sequence_tensor is one dense
// [1, tokens, heads, dim] run per layer and K/V that agrees with the paged view (tensor() and
// the block table); memory grows with the tokens and goes back on truncate and free; slots run
// out with a typed error naming the numbers; outgrowing a slot and fork are refused with nothing
// changed; the geometry check names what is missing; DLPack describes the run.
#define BOOST_TEST_MODULE kv sequence_contiguous
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/interop/dlpack.hpp"

using namespace vmmpp_test;
using vmmpp::kv_part;

namespace {

using layout = vmmpp::sequence_contiguous;
using cases = boost::mpl::list<kv_case<vmmpp::host_config, layout>, kv_case<host_preallocated_config, layout>,
                               kv_case<host_chunked_budget_config, layout>, kv_case<host_external_config, layout>>;

// 4 KiB blocks per layer and K/V; 60 tokens a sequence at most: 8 blocks a slot, 8 slots.
constexpr vmmpp::kv_geometry geom{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f32,
                                  .block_tokens = 8, .max_blocks = 64, .max_tokens_per_sequence = 60};

bool contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

/// The value written at token t, head h, dim d of layer l's part p of sequence s.
float value(std::size_t s, std::size_t t, std::size_t h, std::size_t d, std::uint32_t l, unsigned p) {
    return static_cast<float>(s * 100000 + t * 1000 + h * 100 + d + l * 10 + p) * 0.5f;
}

/// Writes the tokens [first, tokens) of `seq` through its sequence tensors.
template <class Cache>
void write_run(const Cache& c, vmmpp::seq_id seq, std::size_t first) {
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        for (unsigned p = 0; p < 2; ++p) {
            const vmmpp::kv_tensor t = c.sequence_tensor(seq, l, static_cast<kv_part>(p));
            auto* base = static_cast<float*>(t.data);
            for (std::int64_t tok = static_cast<std::int64_t>(first); tok < t.shape[1]; ++tok) {
                for (std::int64_t h = 0; h < t.shape[2]; ++h) {
                    for (std::int64_t d = 0; d < t.shape[3]; ++d) {
                        base[tok * t.strides[1] + h * t.strides[2] + d * t.strides[3]] =
                            value(seq, static_cast<std::size_t>(tok), static_cast<std::size_t>(h),
                                  static_cast<std::size_t>(d), l, p);
                    }
                }
            }
        }
    }
}

/// Mismatches when reading every token of `seq` through the paged view: tensor() and the
/// block table, as a paged kernel does.
template <class Cache>
std::size_t paged_mismatches(const Cache& c, vmmpp::seq_id seq) {
    std::size_t bad = 0;
    const auto table = c.block_table(seq);
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        for (unsigned p = 0; p < 2; ++p) {
            const vmmpp::kv_tensor t = c.tensor(l, static_cast<kv_part>(p));
            const auto* base = static_cast<const float*>(t.data);
            for (std::size_t tok = 0; tok < c.tokens(seq); ++tok) {
                const std::int64_t b = table[tok / geom.block_tokens];
                const auto o = static_cast<std::int64_t>(tok % geom.block_tokens);
                for (std::int64_t h = 0; h < geom.kv_heads; ++h) {
                    for (std::int64_t d = 0; d < geom.head_dim; ++d) {
                        bad += base[b * t.strides[0] + o * t.strides[1] + h * t.strides[2] + d] !=
                               value(seq, tok, static_cast<std::size_t>(h), static_cast<std::size_t>(d), l, p);
                    }
                }
            }
        }
    }
    return bad;
}

} // namespace

BOOST_AUTO_TEST_SUITE(sequence_contiguous_layout)

BOOST_AUTO_TEST_CASE_TEMPLATE(each_sequence_is_one_dense_run_per_layer_that_the_paged_view_agrees_with, Case, cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(geom);
    auto& c = *cache;
    BOOST_TEST(c.slot_blocks() == 8u);
    BOOST_TEST(c.slot_count() == 8u);
    const auto a = c.add_sequence();
    const auto b = c.add_sequence();
    BOOST_TEST(c.sequence_slot(a) == 0u);
    BOOST_TEST(c.sequence_slot(b) == 1u);
    c.append(a, 13);
    c.append(b, 5);
    c.append(a, 20);  // grows in place
    const std::vector<std::int32_t> table_a(c.block_table(a).begin(), c.block_table(a).end());
    BOOST_TEST(table_a == (std::vector<std::int32_t>{0, 1, 2, 3, 4}), boost::test_tools::per_element());
    BOOST_TEST(c.block_table(b)[0] == 8);

    const vmmpp::kv_tensor t = c.sequence_tensor(a, 1, kv_part::value);
    BOOST_TEST(t.shape == (std::array<std::int64_t, 4>{1, 33, 2, 64}), boost::test_tools::per_element());
    // Dense row-major [tokens, heads, dim]; the leading stride is one slot.
    BOOST_TEST(t.strides == (std::array<std::int64_t, 4>{8 * 8 * 2 * 64, 2 * 64, 64, 1}), boost::test_tools::per_element());
    BOOST_TEST(t.data == static_cast<void*>(c.value(1, 0)));
    BOOST_TEST(c.sequence_tensor(b, 0, kv_part::key).data == static_cast<void*>(c.key(0, 8)));
    BOOST_TEST(t.device == c.tensor(1, kv_part::value).device);

    write_run(c, a, 0);
    write_run(c, b, 0);
    BOOST_TEST(paged_mismatches(c, a) == 0u);
    BOOST_TEST(paged_mismatches(c, b) == 0u);
    // More tokens: the run's pointer stays, the new tokens follow the old ones.
    c.append(b, 30);
    BOOST_TEST(c.sequence_tensor(b, 0, kv_part::key).data == static_cast<void*>(c.key(0, 8)));
    write_run(c, b, 5);
    BOOST_TEST(paged_mismatches(c, b) == 0u);
    BOOST_TEST(paged_mismatches(c, a) == 0u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(memory_grows_with_the_tokens_and_goes_back_on_truncate_and_free, Case, cases) {
    // One block of K (or V) is one 2 MiB page (the host backing's default, as a GPU's): 1024
    // tokens of 8 heads x 128 f16. 4 blocks a slot, 4 slots.
    constexpr vmmpp::kv_geometry big{.layers = 1, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::f16,
                                     .block_tokens = 1024, .max_blocks = 16, .max_tokens_per_sequence = 4096};
    constexpr std::size_t page = std::size_t{2} << 20;
    kv_factory<Case> factory;
    auto cache = factory.make(big);
    auto& c = *cache;
    auto& pool = c.pool();
    const std::size_t empty = pool.committed_bytes();
    const auto a = c.add_sequence();
    const auto b = c.add_sequence();  // slot 1: blocks 4..7, whose pages lie between a's and the top
    c.append(b, 1);
    const std::size_t with_b = pool.committed_bytes();
    c.append(a, 1024);
    const std::size_t one_block = pool.committed_bytes();
    c.append(a, 2048);
    const std::size_t three_blocks = pool.committed_bytes();
    BOOST_TEST(c.used_blocks() == 4u);
    c.truncate(a, 1025);  // 2 blocks: id 2 goes back
    BOOST_TEST(c.used_blocks() == 3u);
    BOOST_TEST(c.block_refs(2) == 0u);
    const std::size_t two_blocks = pool.committed_bytes();
    c.append(a, 1100);  // a third block again: the same id, in order
    const std::vector<std::int32_t> table(c.block_table(a).begin(), c.block_table(a).end());
    BOOST_TEST(table == (std::vector<std::int32_t>{0, 1, 2}), boost::test_tools::per_element());
    c.free(a);
    const std::size_t after_free = pool.committed_bytes();
    c.free(b);
    BOOST_TEST(c.used_blocks() == 0u);
    BOOST_TEST(c.free_slots() == 4u);
    if constexpr (std::is_same_v<typename Case::config::growth_type, vmmpp::page_granular>) {
        // K and V: two pages a block, committed as the sequence grows, given back as it shrinks.
        BOOST_TEST(with_b == empty + 2 * page);
        BOOST_TEST(one_block == with_b + 2 * page);
        BOOST_TEST(three_blocks == with_b + 6 * page);
        BOOST_TEST(two_blocks == with_b + 4 * page);
        BOOST_TEST(after_free == with_b);
    }
    if constexpr (Case::config::growth_type::is_elastic) {
        BOOST_TEST(three_blocks > empty);
        BOOST_TEST(pool.committed_bytes() == empty);
    } else {
        BOOST_TEST(three_blocks == empty);  // static: everything committed up front
    }
    // The lowest slot is handed out again.
    const auto d = c.add_sequence();
    BOOST_TEST(c.sequence_slot(d) == 0u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(slots_run_out_with_a_typed_error_naming_the_numbers, Case, cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(geom);
    auto& c = *cache;
    std::vector<vmmpp::seq_id> seqs;
    for (int i = 0; i < 8; ++i) {
        seqs.push_back(c.add_sequence());
    }
    BOOST_TEST(c.free_slots() == 0u);
    try {
        (void)c.add_sequence();
        BOOST_FAIL("a ninth sequence got a slot");
    } catch (const vmmpp::out_of_sequence_slots& e) {
        BOOST_TEST(e.slots() == 8u);
        BOOST_TEST(e.slot_blocks() == 8u);
        BOOST_TEST(contains(e.what(), "all 8 are in use"));
        BOOST_TEST(contains(e.what(), "max_tokens_per_sequence 60"));
    }
    BOOST_TEST(c.sequence_count() == 8u);
    c.free(seqs[3]);
    const auto again = c.add_sequence();
    BOOST_TEST(c.sequence_slot(again) == 3u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(outgrowing_a_slot_and_fork_are_refused_and_change_nothing, Case, cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(geom);
    auto& c = *cache;
    const auto a = c.add_sequence();
    c.append(a, 50);
    const std::size_t committed = c.pool().committed_bytes();
    BOOST_TEST(c.can_append(a, 10));
    BOOST_TEST(!c.can_append(a, 11));
    try {
        c.append(a, 11);
        BOOST_FAIL("append past max_tokens_per_sequence succeeded");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(contains(e.what(), "append of 11 tokens"));
        BOOST_TEST(contains(e.what(), "(50 tokens)"));
        BOOST_TEST(contains(e.what(), "max_tokens_per_sequence 60"));
    }
    BOOST_TEST(c.tokens(a) == 50u);
    BOOST_TEST(c.used_blocks() == 7u);
    BOOST_TEST(c.pool().committed_bytes() == committed);
    c.append(a, 10);  // exactly to the limit
    BOOST_TEST(c.tokens(a) == 60u);

    try {
        (void)c.fork(a);
        BOOST_FAIL("fork succeeded");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(contains(e.what(), "fork of sequence"));
        BOOST_TEST(contains(e.what(), "sequence_contiguous"));
        BOOST_TEST(contains(e.what(), "cannot share blocks"));
    }
    BOOST_TEST(c.sequence_count() == 1u);
    BOOST_TEST(c.block_refs(0) == 1u);
    BOOST_CHECK_THROW((void)c.fork(12345), vmmpp::invalid_argument);  // unknown first
}

BOOST_AUTO_TEST_CASE(the_geometry_check_names_what_is_missing) {
    vmmpp::kv_geometry g = geom;
    g.max_tokens_per_sequence = 0;
    try {
        vmmpp::kv_cache<vmmpp::host_config, layout> c(g);
        BOOST_FAIL("built without max_tokens_per_sequence");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(contains(e.what(), "max_tokens_per_sequence is 0"));
    }
    g.max_tokens_per_sequence = 64 * 8 + 1;  // 65 blocks of a 64-block cache
    try {
        vmmpp::kv_cache<vmmpp::host_config, layout> c(g);
        BOOST_FAIL("built with a slot larger than the cache");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(contains(e.what(), "needs 65 blocks of 8 tokens"));
        BOOST_TEST(contains(e.what(), "max_blocks 64"));
    }
    // 3 blocks a slot in 64 blocks: 21 slots, the last block unused.
    g.max_tokens_per_sequence = 24;
    vmmpp::kv_cache<vmmpp::host_config, layout> c(g);
    BOOST_TEST(c.slot_count() == 21u);
    // Paged layouts ignore the field.
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major> paged(g);
    const auto s = paged.add_sequence();
    paged.append(s, 100);
    BOOST_TEST(paged.tokens(s) == 100u);
}

BOOST_AUTO_TEST_CASE(dlpack_describes_the_dense_run) {
    vmmpp::kv_cache<vmmpp::host_config, layout> c(geom);
    const auto a = c.add_sequence();
    const auto b = c.add_sequence();
    c.append(a, 3);
    c.append(b, 17);
    const vmmpp::kv_tensor t = c.sequence_tensor(b, 1, kv_part::key);
    DLManagedTensor* m = vmmpp::to_dlpack(t, vmmpp::dlpack_device(c));
    BOOST_TEST(m->dl_tensor.ndim == 4);
    BOOST_TEST(m->dl_tensor.device.device_type == kDLCPU);
    BOOST_TEST(m->dl_tensor.shape[1] == 17);
    BOOST_TEST(m->dl_tensor.shape[2] == 2);
    BOOST_TEST(m->dl_tensor.shape[3] == 64);
    BOOST_TEST(m->dl_tensor.strides[1] == 128);
    BOOST_TEST(m->dl_tensor.strides[2] == 64);
    BOOST_TEST(m->dl_tensor.strides[3] == 1);
    BOOST_TEST(static_cast<std::byte*>(m->dl_tensor.data) + m->dl_tensor.byte_offset == c.key(1, 8));
    m->deleter(m);
}

BOOST_AUTO_TEST_SUITE_END()
