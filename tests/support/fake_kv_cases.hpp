// tests/support/fake_kv_cases.hpp: what the fake-driver stream-order tests (stream order, copy
// order) run over: the GPU configurations whose backing the fake stands in for, with layouts, and
// a geometry whose block_major blocks are one page of the fake each.
#pragma once

#include <boost/mpl/list.hpp>

#include <cstddef>

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

namespace vmmpp_test {

/// A vmm configuration and a layout.
template <class Config, class Layout>
struct fake_kv_case {
    using config = Config;
    using cache = vmmpp::kv_cache<Config, Layout>;
};
using vmm_chunked4_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<4>, vmmpp::shared_budget>;
using fake_kv_cases = boost::mpl::list<fake_kv_case<vmmpp::elastic_page_config, vmmpp::block_major>,
                                       fake_kv_case<vmmpp::elastic_page_config, vmmpp::layer_major>,
                                       fake_kv_case<vmmpp::elastic_config, vmmpp::block_major>,
                                       fake_kv_case<vmm_chunked4_config, vmmpp::block_major>>;

// 8 layers, 2 heads of 64, fp16, 16 tokens: a K or V piece is 4 KiB; in block_major a block is
// 64 KiB, exactly one page of the fake (granularity 64 KiB), so a block's last reference takes
// its page with it.
constexpr vmmpp::kv_geometry fake_kv_geometry{.layers = 8, .kv_heads = 2, .head_dim = 64,
                                              .type = vmmpp::dtype::f16, .block_tokens = 16, .max_blocks = 256};
constexpr std::size_t fake_kv_piece = 16 * 2 * 64 * 2;

} // namespace vmmpp_test
