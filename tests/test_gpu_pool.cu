// The pool behaviour suite over the GPU configurations, plus a kernel that uses pool memory.
#define VMMPP_GPU_TEST_NAME "gpu pool"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <boost/mpl/list.hpp>

#include <algorithm>
#include <chrono>
#include <thread>

#include "support/pool_factories.hpp"

using pool_configs = boost::mpl::list<vmmpp::elastic_config, vmmpp::elastic_page_config, vmmpp::static_config,
                                      vmmpp::gh200_config, vmmpp_test::vmm_chunked_config>;
/// The mapper over one 2 MiB handle per unit, for exact per-page accounting.
using mapped_page_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::mapped_ahead<vmmpp::page_granular>, vmmpp::shared_budget>;
#include "support/pool_suite.hpp"

namespace {

__global__ void add_one(unsigned char* p, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        p[i] = static_cast<unsigned char>(p[i] + 1);
    }
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(held_ranges_are_usable_from_kernels, Config, pool_configs) {
    using namespace vmmpp_test;
    pool_factory<Config> factory;
    auto pool = factory.make(32 * page);
    pool->ensure_committed(3 * page + 17, 5 * page);
    auto* p = reinterpret_cast<unsigned char*>(pool->base()) + 3 * page + 17;
    const std::size_t n = 5 * page;
    cuda_check(cudaMemset(p, 41, n));
    add_one<<<128, 256>>>(p, n);
    cuda_check(cudaGetLastError());
    std::vector<unsigned char> host(n);
    cuda_check(cudaMemcpy(host.data(), p, n, cudaMemcpyDeviceToHost));
    std::size_t bad = 0;
    for (unsigned char c : host) {
        bad += c != 42;
    }
    BOOST_TEST(bad == 0u);
    pool->release(3 * page + 17, 5 * page);
}

BOOST_AUTO_TEST_CASE(elastic_pool_returns_device_memory) {
    using namespace vmmpp_test;
    cuda_check(cudaSetDevice(0));
    cuda_check(cudaFree(nullptr));
    vmmpp::budget budget(8 * GiB);
    vmmpp::elastic_pool<vmmpp::elastic_page_config> pool(8 * GiB, {}, {}, budget.register_model("m", 8 * GiB));
    const std::size_t start = free_device_bytes();
    pool.ensure_committed(0, GiB);
    BOOST_TEST(pool.stats().commits == 512u);  // 2 MiB pages
    BOOST_TEST(start - free_device_bytes() >= GiB);
    pool.release(0, GiB);
    BOOST_TEST(pool.committed_bytes() == 0u);
    BOOST_TEST(free_device_bytes() + 4 * MiB >= start);
    BOOST_TEST(budget.stats().committed == 0u);
    const double driver_us = std::chrono::duration<double, std::micro>(pool.stats().driver_time).count();
    BOOST_TEST_MESSAGE("driver time for 512 commits + 512 decommits: " << driver_us << " us");
}

BOOST_AUTO_TEST_CASE(vmm_keeps_handles_for_reuse_and_the_pool_charges_them) {
    using namespace vmmpp_test;
    cuda_check(cudaSetDevice(0));
    cuda_check(cudaFree(nullptr));
    vmmpp::budget budget(GiB);
    vmmpp::elastic_pool<vmmpp::elastic_page_config> pool(GiB, vmmpp::vmm_options{.max_cached_handles = 4}, {},
                                                         budget.register_model("m", GiB));
    const std::size_t start = free_device_bytes();
    pool.ensure_committed(0, 8 * page);
    pool.release(0, 8 * page);
    auto s = pool.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.cached_bytes == 4 * page);  // four kept, four released
    BOOST_TEST(pool.backing().cached_handle_count() == 4u);
    BOOST_TEST(budget.stats().committed == 4 * page);
    BOOST_TEST(start - free_device_bytes() >= 4 * page);  // kept handles still occupy the device
    // Reused handles hold memory that works like new: map, write from a kernel, read back.
    pool.ensure_committed(16 * page, 3 * page);
    BOOST_TEST(pool.backing().reused_handles() == 3u);
    BOOST_TEST(budget.stats().committed == 4 * page);
    auto* p = reinterpret_cast<unsigned char*>(pool.base()) + 16 * page;
    cuda_check(cudaMemset(p, 9, 3 * page));
    add_one<<<128, 256>>>(p, 3 * page);
    cuda_check(cudaGetLastError());
    std::vector<unsigned char> host(3 * page);
    cuda_check(cudaMemcpy(host.data(), p, host.size(), cudaMemcpyDeviceToHost));
    BOOST_TEST(std::count(host.begin(), host.end(), 10) == static_cast<std::ptrdiff_t>(host.size()));
    pool.release(16 * page, 3 * page);
    BOOST_TEST(pool.trim() == 4 * page);  // trim drops kept handles too
    BOOST_TEST(budget.stats().committed == 0u);
    BOOST_TEST(free_device_bytes() + 4 * MiB >= start);
}

BOOST_AUTO_TEST_CASE(the_mapper_maps_ahead_on_the_gpu_and_accounts_exactly) {
    using namespace vmmpp_test;
    cuda_check(cudaSetDevice(0));
    cuda_check(cudaFree(nullptr));
    vmmpp::budget budget(GiB);
    vmmpp::mapped_ahead<vmmpp::page_granular> growth;
    growth.low_watermark = 4;
    growth.high_watermark = 8;
    growth.release_delay = std::chrono::milliseconds(20);
    const std::size_t start = free_device_bytes();
    {
        vmmpp::elastic_pool<mapped_page_config> pool(GiB, vmmpp::vmm_options{.max_cached_handles = 2}, growth,
                                                     budget.register_model("m", GiB));
        pool.will_need(0, 1);
        for (int i = 0; i < 5000 && pool.stats().idle_units < 8; ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        BOOST_TEST(pool.stats().idle_units == 8u);
        BOOST_TEST(budget.stats().committed == 8 * page);
        for (std::size_t p = 0; p < 64; ++p) {
            pool.ensure_committed(p * page, page);
            for (int i = 0; i < 5000 && pool.stats().idle_units < 4; ++i) {
                std::this_thread::sleep_for(std::chrono::microseconds(200));
            }
        }
        auto* p = reinterpret_cast<unsigned char*>(pool.base());
        cuda_check(cudaMemset(p, 1, 64 * page));
        add_one<<<128, 256>>>(p, 64 * page);
        cuda_check(cudaDeviceSynchronize());
        // Exact once no unit is in flight (the mapper may still be refilling).
        const auto settled = [&] {
            const auto s = pool.stats();
            return budget.stats().committed == s.charged && s.charged == s.committed + s.cached_bytes;
        };
        for (int i = 0; i < 5000 && !settled(); ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        BOOST_TEST(settled());
        const auto s = pool.stats();
        BOOST_TEST(s.sync_commits == 0u);
        BOOST_TEST(s.mapper_failures == 0u);
        pool.release(0, 64 * page);
        for (int i = 0; i < 5000 && pool.stats().idle_units > 8; ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        BOOST_TEST(pool.stats().idle_units == 8u);  // the rest went back lazily, on the mapper's thread
        BOOST_TEST(pool.stats().cached_bytes == 2 * page);
        BOOST_TEST(budget.stats().committed == 10 * page);
    }
    BOOST_TEST(budget.stats().committed == 0u);
    BOOST_TEST(free_device_bytes() + 4 * MiB >= start);
}
