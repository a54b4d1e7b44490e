// How the kv_cache tests build a cache of each configuration and layout.
#pragma once

#include <memory>
#include <vector>

#include "support/pool_factories.hpp"
#include "vmmpp/kv/cache.hpp"

namespace vmmpp_test {

/// A configuration and a layout: one case of the kv_cache suite.
template <class Config, class Layout = vmmpp::layer_major>
struct kv_case {
    using config = Config;
    using layout = Layout;
    using cache = vmmpp::kv_cache<Config, Layout>;
};

template <class Case, class Config = typename Case::config>
struct kv_factory {
    std::unique_ptr<typename Case::cache> make(const vmmpp::kv_geometry& g) {
        return std::make_unique<typename Case::cache>(g);
    }
};

template <class Case, class Backing, class Growth, class Mutex>
struct kv_factory<Case, vmmpp::pool_config<Backing, Growth, vmmpp::shared_budget, Mutex>> {
    std::unique_ptr<vmmpp::budget> budget;
    std::size_t limit = 0;  // 0: the whole span
    std::unique_ptr<typename Case::cache> make(const vmmpp::kv_geometry& g) {
        const std::size_t bytes = limit != 0 ? limit : (g.total_bytes() / page + 1) * page;
        budget = std::make_unique<vmmpp::budget>(bytes);
        return std::make_unique<typename Case::cache>(g, typename Backing::options{}, Growth{},
                                                      budget->register_model("kv", bytes));
    }
};

template <class Case>
struct kv_factory<Case, host_external_config> {
    std::vector<std::byte> buffer;
    std::unique_ptr<typename Case::cache> make(const vmmpp::kv_geometry& g) {
        buffer.assign((g.total_bytes() / page + 1) * page, std::byte{0});
        return std::make_unique<typename Case::cache>(g, vmmpp::external_options{.pointer = buffer.data()});
    }
};

} // namespace vmmpp_test
