// How the pool tests build a pool of each configuration: one factory per config, owning
// whatever the pool needs beside it (a budget, a borrowed buffer).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <vector>

#include "vmmpp/config.hpp"

namespace vmmpp_test {

inline constexpr std::size_t page = std::size_t{2} << 20;

// Test-only configurations beside the named ones, so every policy is exercised on the host.
using host_chunked_budget_config = vmmpp::pool_config<vmmpp::host, vmmpp::chunked<4>, vmmpp::shared_budget>;
using host_external_config =
    vmmpp::pool_config<vmmpp::external<vmmpp::host_accessible>, vmmpp::preallocated, vmmpp::unlimited>;
using host_preallocated_config = vmmpp::pool_config<vmmpp::host, vmmpp::preallocated, vmmpp::unlimited>;
using vmm_chunked_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<8>, vmmpp::unlimited>;
/// elastic_config's growth on the host backing.
using host_adaptive_config = vmmpp::pool_config<vmmpp::host, vmmpp::adaptive_extents, vmmpp::shared_budget>;

/// The growth policy the behaviour suites build pools with: the policy's defaults, except that
/// adaptive_extents commits one page per extent and keeps no spares there, so the suites' exact
/// page accounting (expected_committed) holds for it too. Its extents have tests of their own
/// (test_pool.cpp, test_kv_cache.cpp, the stress test).
template <class Growth>
Growth suite_growth() {
    if constexpr (std::is_same_v<Growth, vmmpp::adaptive_extents>) {
        return vmmpp::adaptive_extents{.max_extent_pages = 1, .fast_growth_bytes_per_second = 0, .spare_pages = 0};
    } else {
        return Growth{};
    }
}

template <class Config>
struct pool_factory {
    // Default: the backing's default options, default growth and quota.
    std::unique_ptr<vmmpp::elastic_pool<Config>> make(std::size_t capacity) {
        return std::make_unique<vmmpp::elastic_pool<Config>>(capacity);
    }
};

/// Configurations whose quota is a shared_budget get a budget of their own, twice the capacity.
template <class Backing, class Growth, class Mutex>
struct pool_factory<vmmpp::pool_config<Backing, Growth, vmmpp::shared_budget, Mutex>> {
    using config = vmmpp::pool_config<Backing, Growth, vmmpp::shared_budget, Mutex>;
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<vmmpp::elastic_pool<config>> make(std::size_t capacity) {
        budget = std::make_unique<vmmpp::budget>(2 * capacity);
        return std::make_unique<vmmpp::elastic_pool<config>>(capacity, typename Backing::options{}, suite_growth<Growth>(),
                                                             budget->register_model("test", capacity));
    }
};

template <>
struct pool_factory<host_external_config> {
    std::vector<std::byte> buffer;
    std::unique_ptr<vmmpp::elastic_pool<host_external_config>> make(std::size_t capacity) {
        buffer.assign(capacity, std::byte{0});
        return std::make_unique<vmmpp::elastic_pool<host_external_config>>(
            capacity, vmmpp::external_options{.pointer = buffer.data()});
    }
};

/// Bytes a pool of this configuration must have committed when exactly the pages in `held`
/// (one flag per page) are held, with no spares.
template <class Config, class Pool>
std::size_t expected_committed(const Pool& pool, const std::vector<bool>& held) {
    if constexpr (!Config::growth_type::is_elastic) {
        return pool.capacity();
    } else {
        const std::size_t unit_pages = pool.unit_bytes() / pool.page_bytes();
        std::size_t bytes = 0;
        for (std::size_t first = 0; first < held.size(); first += unit_pages) {
            const std::size_t last = std::min(held.size(), first + unit_pages);
            for (std::size_t p = first; p < last; ++p) {
                if (held[p]) {
                    bytes += (last - first) * pool.page_bytes();
                    break;
                }
            }
        }
        return bytes;
    }
}

} // namespace vmmpp_test
