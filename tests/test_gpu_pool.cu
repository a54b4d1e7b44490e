// The pool behaviour suite over the GPU configurations, plus a kernel that uses pool memory.
#define VMMPP_GPU_TEST_NAME "gpu pool"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <boost/mpl/list.hpp>

#include "support/pool_factories.hpp"

using pool_configs = boost::mpl::list<vmmpp::elastic_config, vmmpp::static_config, vmmpp::gh200_config,
                                      vmmpp_test::vmm_chunked_config>;
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
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(8 * GiB, {}, {}, budget.register_model("m", 8 * GiB));
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
