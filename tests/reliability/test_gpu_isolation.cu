// Tenant isolation (issue 7) on the GPU: two models' pools on one budget; model A fills its
// memory and gives it back, model B commits the same amount and a kernel counts the non-zero
// bytes B sees: none over zeroing<vmm>. The same over a borrowed device buffer, where without
// zeroing B must see A's bytes (so the test can fail), over managed memory, and through a
// kv_cache over zeroing<vmm> (whose copy-on-write must still run on the device).
#define VMMPP_GPU_TEST_NAME "gpu isolation"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <cstdint>
#include <vector>

#include "vmmpp/backing/zeroing.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

using namespace vmmpp_test;

namespace {

__global__ void fill_words(std::uint32_t* p, std::size_t n, std::uint32_t value) {
    for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        p[i] = value;
    }
}

__global__ void count_nonzero_words(const std::uint32_t* p, std::size_t n, unsigned long long* count) {
    unsigned long long mine = 0;
    for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        mine += p[i] != 0;
    }
    if (mine != 0) {
        atomicAdd(count, mine);
    }
}

void fill(std::byte* p, std::size_t bytes, std::uint32_t value) {
    fill_words<<<256, 256>>>(reinterpret_cast<std::uint32_t*>(p), bytes / 4, value);
    cuda_check(cudaGetLastError());
    cuda_check(cudaDeviceSynchronize());
}

/// Non-zero 32-bit words in [p, p+bytes), counted by a kernel.
unsigned long long nonzero_words(const std::byte* p, std::size_t bytes) {
    unsigned long long* d_count = nullptr;
    cuda_check(cudaMalloc(&d_count, sizeof *d_count));
    cuda_check(cudaMemset(d_count, 0, sizeof *d_count));
    count_nonzero_words<<<256, 256>>>(reinterpret_cast<const std::uint32_t*>(p), bytes / 4, d_count);
    cuda_check(cudaGetLastError());
    unsigned long long count = 0;
    cuda_check(cudaMemcpy(&count, d_count, sizeof count, cudaMemcpyDeviceToHost));
    cuda_check(cudaFree(d_count));
    return count;
}

using plain_vmm = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::shared_budget>;
using zeroed_vmm = vmmpp::pool_config<vmmpp::zeroing<vmmpp::vmm>, vmmpp::page_granular, vmmpp::shared_budget>;

/// Model A (plain vmm) fills `bytes` and gives them back; model B (`Config`) then commits as
/// much on the same budget, which has room for only one of them. Returns B's non-zero words.
template <class Config>
unsigned long long words_b_sees_after_a(vmmpp::budget& budget, std::size_t bytes, const std::string& name) {
    {
        vmmpp::elastic_pool<plain_vmm> a(bytes, {}, {}, budget.register_model("a for " + name, bytes));
        a.ensure_committed(0, bytes);
        fill(a.base(), bytes, 0xa5a5a5a5u);
        a.release(0, bytes);  // page-granular: every page goes back to the driver now
        BOOST_TEST(a.committed_bytes() == 0u);
    }
    vmmpp::elastic_pool<Config> b(bytes, {}, {}, budget.register_model(name, bytes));
    b.ensure_committed(0, bytes);
    BOOST_TEST(budget.stats().committed == bytes);
    return nonzero_words(b.base(), bytes);
}

} // namespace

BOOST_AUTO_TEST_CASE(a_pool_over_zeroing_vmm_never_sees_another_pools_bytes) {
    constexpr std::size_t bytes = 256 * MiB;
    vmmpp::budget budget(bytes);
    BOOST_TEST(words_b_sees_after_a<zeroed_vmm>(budget, bytes, "b zeroed") == 0u);
    // Without zeroing, whatever the driver hands back: reported, not required (the driver may
    // scrub physical memory itself).
    const auto plain = words_b_sees_after_a<plain_vmm>(budget, bytes, "b plain");
    BOOST_TEST_MESSAGE("without zeroing, model B saw " << plain << " of " << bytes / 4 << " words of model A's");
}

BOOST_AUTO_TEST_CASE(a_pool_over_zeroing_external_device_memory) {
    constexpr std::size_t bytes = 16 * MiB;
    void* buffer = nullptr;
    cuda_check(cudaMalloc(&buffer, bytes));
    auto* p = static_cast<std::byte*>(buffer);
    using zeroed = vmmpp::pool_config<vmmpp::zeroing<vmmpp::external<vmmpp::device_accessible>>, vmmpp::preallocated,
                                      vmmpp::unlimited>;
    using plain = vmmpp::pool_config<vmmpp::external<vmmpp::device_accessible>, vmmpp::preallocated, vmmpp::unlimited>;
    fill(p, bytes, 0x5a5a5a5au);
    {
        vmmpp::elastic_pool<plain> b(bytes, {.pointer = buffer, .device = 0});
        BOOST_TEST(nonzero_words(b.base(), bytes) == bytes / 4);  // the previous tenant's bytes
    }
    {
        vmmpp::elastic_pool<zeroed> b(bytes, {.pointer = buffer, .device = 0});
        BOOST_TEST(b.device() == 0);
        BOOST_TEST(nonzero_words(b.base(), bytes) == 0u);
    }
    cuda_check(cudaFree(buffer));
}

BOOST_AUTO_TEST_CASE(zeroing_managed_memory_on_the_device) {
    constexpr std::size_t bytes = 16 * MiB;  // managed memory: keep it small (docs/ARCHITECTURE.md, "Managed memory")
    using config = vmmpp::pool_config<vmmpp::zeroing<vmmpp::managed_prefetch<>>, vmmpp::chunked<2>, vmmpp::unlimited>;
    vmmpp::elastic_pool<config> pool(bytes);
    pool.ensure_committed(0, 4 * MiB);
    fill(pool.base(), 4 * MiB, 0x12345678u);
    pool.release(0, 4 * MiB);
    pool.ensure_committed(0, 4 * MiB);
    BOOST_TEST(nonzero_words(pool.base(), 4 * MiB) == 0u);
}

BOOST_AUTO_TEST_CASE(a_kv_cache_over_zeroing_vmm) {
    using config = vmmpp::pool_config<vmmpp::zeroing<vmmpp::vmm>, vmmpp::page_granular, vmmpp::unlimited>;
    constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 2048};
    vmmpp::kv_cache<config> c(g);
    const auto a = c.add_sequence();
    c.append(a, 600);
    const auto t = c.tensor(0, vmmpp::kv_part::key);
    BOOST_TEST(t.device == 0);
    for (std::uint32_t l = 0; l < g.layers; ++l) {
        for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
            BOOST_TEST(nonzero_words(c.address(l, part, 0), 38 * g.block_tensor_bytes()) == 0u);
        }
    }
    fill(c.address(0, vmmpp::kv_part::key, 37), g.block_tensor_bytes(), 7u);
    const auto b = c.fork(a);
    c.append(b, 1);  // copy-on-write of block 37 (600 = 37 * 16 + 8), on the device
    BOOST_TEST(c.cow_copies() == 1u);
    cuda_check(cudaStreamSynchronize(nullptr));
    BOOST_TEST(nonzero_words(c.address(0, vmmpp::kv_part::key, c.block_table(b).back()), g.block_tensor_bytes()) ==
               g.block_tensor_bytes() / 4);
    c.free(a);
    c.free(b);
    BOOST_TEST(c.pool().committed_bytes() == 0u);
}
