// Quantized KV (issue 31) on host memory, in every layout that keeps scales (CI runs these for
// real): fp8 with per-token-head scales, NVFP4 (two E2M1 values a byte, an fp8 scale per 16
// values) and MXFP8-like groups; bytes per token exact to the formula; the data and scale tensor
// descriptors of every block cover its bytes exactly once, with no overlap; copy-on-write copies
// the scales with the data; geometries the layouts cannot hold are refused with the numbers.
#define BOOST_TEST_MODULE quantized kv
#include "support/cpu_main.hpp"

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/interop/dlpack.hpp"
#include "vmmpp/kv/layout_list.hpp"

using namespace vmmpp_test;
using vmmpp::dtype;
using vmmpp::kv_part;

namespace {

/// Layouts that keep scales beside each block's data: the split K/V layouts and mla.
template <class L>
struct keeps_scales : std::bool_constant<vmmpp::is_split_kv_layout<L>::value || std::is_same_v<L, vmmpp::mla>> {};
using scaled_cases =
    vmmpp::apply_t<kv_cases_over<vmmpp::host_config, vmmpp::filter_t<vmmpp::kv_layouts, keeps_scales>>, std::tuple>;

/// Llama-3-8B-like heads: 8 KV heads of 128.
vmmpp::kv_geometry heads_8x128(dtype type, vmmpp::kv_scales scales) {
    return {.layers = 32, .kv_heads = 8, .head_dim = 128, .type = type, .block_tokens = 16, .max_blocks = 64,
            .scales = scales};
}

}  // namespace

BOOST_AUTO_TEST_CASE(bytes_per_token_are_exact_to_the_formula) {
    // bf16: 8 heads x 128 x 2 bytes = 2048 a token of one layer's K.
    BOOST_TEST(heads_8x128(dtype::bf16, {}).token_tensor_bytes() == 2048u);
    // fp8 with an f32 scale per token and head: 8 x (128 + 4) = 1056.
    BOOST_TEST(heads_8x128(dtype::fp8_e4m3, {.group = 128, .type = dtype::f32}).token_tensor_bytes() == 1056u);
    // NVFP4: 8 x (128 / 2 + 128 / 16 x 1) = 8 x 72 = 576.
    const auto nvfp4 = heads_8x128(dtype::fp4_e2m1x2, {.group = 16, .type = dtype::fp8_e4m3});
    BOOST_TEST(nvfp4.token_tensor_bytes() == 576u);
    BOOST_TEST(nvfp4.row_elements() == 64u);
    BOOST_TEST(nvfp4.row_scales() == 8u);
    BOOST_TEST(nvfp4.block_data_bytes() == 16u * 8 * 64);
    BOOST_TEST(nvfp4.block_tensor_bytes() == 16u * 576);
    // A whole token, K and V of 32 layers: 36,864 bytes against bf16's 131,072 (0.28x).
    BOOST_TEST(nvfp4.block_bytes() / nvfp4.block_tokens == 36864u);
    // MXFP8-like: a byte scale per 32 values: 8 x (128 + 4) = 1056.
    BOOST_TEST(heads_8x128(dtype::fp8_e4m3, {.group = 32, .type = dtype::fp8_e4m3}).token_tensor_bytes() == 1056u);
    // The span of every layout holds exactly max_blocks blocks of those bytes.
    using nvfp4_cache = vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major>;
    BOOST_TEST(vmmpp::layer_major::span_bytes(nvfp4) == 64u * 16 * 576 * 2 * 32);
    nvfp4_cache c(nvfp4);
    const auto s = c.add_sequence();
    c.append(s, 17);  // two blocks: every piece of each is 16 x 576 bytes
    std::size_t held = 0;
    vmmpp::layer_major::for_each_piece(nvfp4, 0, [&](std::size_t, std::size_t bytes) { held += bytes; });
    BOOST_TEST(held == nvfp4.block_bytes());
}

BOOST_AUTO_TEST_CASE_TEMPLATE(data_and_scales_cover_each_block_exactly_once, Case, scaled_cases) {
    using L = typename Case::layout;
    for (const auto& [type, scales] : {std::pair{dtype::fp8_e4m3, vmmpp::kv_scales{.group = 8, .type = dtype::f32}},
                                       std::pair{dtype::fp4_e2m1x2, vmmpp::kv_scales{.group = 16, .type = dtype::fp8_e4m3}},
                                       std::pair{dtype::bf16, vmmpp::kv_scales{.group = 32, .type = dtype::bf16}}}) {
        BOOST_TEST_CONTEXT("dtype " << static_cast<int>(type) << ", group " << scales.group) {
            vmmpp::kv_geometry g{.layers = 2, .kv_heads = 2, .head_dim = 32, .type = type, .block_tokens = 4,
                                 .max_blocks = 4, .scales = scales};
            g = fit_geometry<L>(g);
            typename Case::cache c(g);
            const auto s = c.add_sequence();
            c.append(s, 4 * 4);  // every block live, so every byte may be touched
            for (std::uint32_t layer = 0; layer < g.layers; ++layer) {
                for (kv_part part : {kv_part::key, kv_part::value}) {
                    if (L::parts == 1 && part == kv_part::value) continue;
                    // Touch every element of the data and of the scales; count touches per byte.
                    const std::byte* base = c.address(layer, part, 0);
                    std::vector<int> touched(g.block_tensor_bytes() * g.max_blocks, 0);
                    std::size_t beyond = 0;
                    auto touch = [&](const vmmpp::kv_tensor& t) {
                        const std::size_t size = vmmpp::size_of(t.type);
                        for (std::int64_t b = 0; b < t.shape[0]; ++b)
                            for (std::int64_t k = 0; k < t.shape[1]; ++k)
                                for (std::int64_t h = 0; h < t.shape[2]; ++h)
                                    for (std::int64_t d = 0; d < t.shape[3]; ++d) {
                                        const std::int64_t e = b * t.strides[0] + k * t.strides[1] + h * t.strides[2] +
                                                               d * t.strides[3];
                                        const std::byte* at = static_cast<const std::byte*>(t.data) + e * static_cast<std::int64_t>(size);
                                        for (std::size_t i = 0; i < size; ++i) {
                                            // Each block's bytes: [block, block + block_tensor_bytes) from its own address.
                                            const std::byte* block = c.address(layer, part, static_cast<std::int32_t>(b));
                                            const auto in = static_cast<std::size_t>(at + i - block);
                                            if (at + i < block || in >= g.block_tensor_bytes()) {
                                                ++beyond;
                                            } else {
                                                ++touched[static_cast<std::size_t>(b) * g.block_tensor_bytes() + in];
                                            }
                                        }
                                    }
                    };
                    const vmmpp::kv_tensor data = c.tensor(layer, part);
                    const vmmpp::kv_tensor scale = c.scale_tensor(layer, part);
                    BOOST_TEST(data.data == static_cast<const void*>(base));
                    BOOST_TEST(data.shape[3] == static_cast<std::int64_t>(g.row_elements()));
                    BOOST_TEST(scale.shape[3] == static_cast<std::int64_t>(g.row_scales()));
                    BOOST_TEST((scale.type == scales.type));
                    touch(data);
                    touch(scale);
                    BOOST_TEST(beyond == 0u);
                    BOOST_TEST(std::count(touched.begin(), touched.end(), 1) == static_cast<std::ptrdiff_t>(touched.size()));
                }
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(copy_on_write_copies_the_scales) {
    const vmmpp::kv_geometry g{.layers = 2, .kv_heads = 2, .head_dim = 32, .type = dtype::fp4_e2m1x2,
                               .block_tokens = 4, .max_blocks = 8, .scales = {.group = 16, .type = dtype::fp8_e4m3}};
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major> c(g);
    const auto a = c.add_sequence();
    c.append(a, 2);  // a partly filled block
    const std::int32_t block = c.block_table(a)[0];
    const vmmpp::kv_tensor scale = c.scale_tensor(1, kv_part::value);
    auto scale_at = [&](std::int32_t b, std::int64_t token, std::int64_t head, std::int64_t group) {
        return static_cast<unsigned char*>(scale.data) +
               (b * scale.strides[0] + token * scale.strides[1] + head * scale.strides[2] + group * scale.strides[3]);
    };
    *scale_at(block, 1, 1, 1) = 0x5c;
    const auto b = c.fork(a);
    c.append(b, 1);  // copy-on-write of the shared partial block
    const std::int32_t copy = c.block_table(b)[0];
    BOOST_TEST(copy != block);
    BOOST_TEST(*scale_at(copy, 1, 1, 1) == 0x5c);
}

BOOST_AUTO_TEST_CASE(geometries_that_do_not_fit_are_refused_with_the_numbers) {
    auto refused = [](vmmpp::kv_geometry g, const std::string& needle) {
        try {
            g.validate();
        } catch (const vmmpp::invalid_argument& e) {
            BOOST_TEST_INFO("message: " << e.what());
            BOOST_TEST(std::string(e.what()).find(needle) != std::string::npos);
            return;
        }
        BOOST_ERROR("not refused: " << needle);
    };
    const vmmpp::kv_geometry base{.layers = 2, .kv_heads = 1, .head_dim = 32, .type = dtype::fp8_e4m3,
                                  .block_tokens = 4, .max_blocks = 8};
    auto with = [&](dtype type, std::uint32_t head_dim, vmmpp::kv_scales scales) {
        vmmpp::kv_geometry g = base;
        g.type = type;
        g.head_dim = head_dim;
        g.scales = scales;
        return g;
    };
    refused(with(dtype::fp4_e2m1x2, 33, {}), "head_dim 33 must be even");
    refused(with(dtype::fp8_e4m3, 32, {.group = 12, .type = dtype::f32}), "scales.group 12 must divide head_dim 32");
    refused(with(dtype::fp4_e2m1x2, 32, {.group = 1, .type = dtype::fp8_e4m3}), "and be even");
    refused(with(dtype::fp8_e4m3, 32, {.group = 16, .type = dtype::fp4_e2m1x2}), "scales.type must be");
    // bf16 data, one fp8 scale a token: the next token's data would start on an odd byte.
    refused(with(dtype::bf16, 32, {.group = 32, .type = dtype::fp8_e4m3}), "1 bytes of scales and 64 bytes of data");
    // Layouts that keep no scales.
    const auto scaled = with(dtype::fp8_e4m3, 32, {.group = 32, .type = dtype::f32});
    BOOST_CHECK_THROW((vmmpp::kv_cache<vmmpp::host_config, vmmpp::packed_kv>(scaled)), vmmpp::invalid_argument);
    auto slotted = scaled;
    slotted.max_tokens_per_sequence = 16;
    BOOST_CHECK_THROW((vmmpp::kv_cache<vmmpp::host_config, vmmpp::sequence_contiguous>(slotted)), vmmpp::invalid_argument);
    // No scales: no scale tensor.
    vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major> plain(base);
    BOOST_CHECK_THROW((void)plain.scale_tensor(0, kv_part::key), vmmpp::invalid_argument);
}

BOOST_AUTO_TEST_CASE(dlpack_carries_fp4_as_bytes) {
    const DLDataType t = vmmpp::dlpack_dtype(dtype::fp4_e2m1x2);
    BOOST_TEST(int{t.code} == int{kDLUInt});
    BOOST_TEST(int{t.bits} == 8);
    BOOST_TEST(int{t.lanes} == 1);
}
