// How the kv_cache tests build a cache of each configuration and layout.
#pragma once

#include <memory>
#include <type_traits>
#include <vector>

#include "support/pool_factories.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/type_list.hpp"

namespace vmmpp_test {

/// A configuration and a layout: one case of the kv_cache suite.
template <class Config, class Layout = vmmpp::layer_major>
struct kv_case {
    using config = Config;
    using layout = Layout;
    using cache = vmmpp::kv_cache<Config, Layout>;
};

/// kv_case<Config, L> for every L of Layouts (a vmmpp::type_list, e.g. vmmpp::paged_kv_layouts).
template <class Config, class Layouts>
using kv_cases_over = vmmpp::product_t<vmmpp::type_list<Config>, Layouts, kv_case>;

/// `g` as `Layout` can hold it: for mla, one head of kv_heads x head_dim (the latent); the
/// same geometry for every other layout.
template <class Layout>
constexpr vmmpp::kv_geometry fit_geometry(vmmpp::kv_geometry g) {
    if constexpr (std::is_same_v<Layout, vmmpp::mla>) {
        g.head_dim *= g.kv_heads;
        g.kv_heads = 1;
    }
    return g;
}

/// Builds a cache of `Case` for a geometry (fitted to the layout by fit_geometry).
template <class Case, class Config = typename Case::config>
struct kv_factory {
    std::unique_ptr<typename Case::cache> make(const vmmpp::kv_geometry& g) {
        return std::make_unique<typename Case::cache>(fit_geometry<typename Case::layout>(g));
    }
};

template <class Case, class Backing, class Growth, class Mutex>
struct kv_factory<Case, vmmpp::pool_config<Backing, Growth, vmmpp::shared_budget, Mutex>> {
    std::unique_ptr<vmmpp::budget> budget;
    std::size_t limit = 0;  // 0: the whole span
    std::unique_ptr<typename Case::cache> make(const vmmpp::kv_geometry& given) {
        const vmmpp::kv_geometry g = fit_geometry<typename Case::layout>(given);
        const std::size_t bytes = limit != 0 ? limit : (Case::layout::span_bytes(g) / page + 1) * page;
        budget = std::make_unique<vmmpp::budget>(bytes);
        return std::make_unique<typename Case::cache>(g, typename Backing::options{}, suite_growth<Growth>(),
                                                      budget->register_model("kv", bytes));
    }
};

template <class Case>
struct kv_factory<Case, host_external_config> {
    std::vector<std::byte> buffer;
    std::unique_ptr<typename Case::cache> make(const vmmpp::kv_geometry& given) {
        const vmmpp::kv_geometry g = fit_geometry<typename Case::layout>(given);
        buffer.assign((Case::layout::span_bytes(g) / page + 1) * page, std::byte{0});
        return std::make_unique<typename Case::cache>(g, vmmpp::external_options{.pointer = buffer.data()});
    }
};

} // namespace vmmpp_test
