// Sleep and wake of a kv_cache on the GPU (elastic_config): a kernel writes a pattern into every
// live block, the cache sleeps (blocks to pinned host memory, every device page given back: the
// device's free memory rises by the cache's committed bytes), wakes (the same offsets committed
// again, the blocks copied back), and a kernel using the addresses taken before the sleep finds
// the pattern intact. The 8 GiB case is also the measurement: sleep and wake time against the
// host<->device copy bandwidth (pinned memory, cudaMemcpyAsync) measured in the same run; with
// VMMPP_SLEEP_JSON=<path> it writes the figures there as JSON.
#define VMMPP_GPU_TEST_NAME "gpu kv sleep"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/quota/shared_budget.hpp"
#include "vmmpp/stats.hpp"

using namespace vmmpp_test;

namespace {

__device__ std::uint32_t pattern(std::uint64_t word, std::uint32_t salt) {
    return static_cast<std::uint32_t>(word * 2654435761ull) ^ salt;
}

/// One CUDA block per piece: writes (or, with `check`, compares) the pattern of each 4-byte word.
__global__ void pattern_kernel(std::byte* base, const std::uint64_t* offsets, const std::uint64_t* sizes,
                               std::uint32_t salt, bool check, unsigned long long* mismatches) {
    const std::uint64_t off = offsets[blockIdx.x];
    const std::uint64_t words = sizes[blockIdx.x] / 4;
    auto* p = reinterpret_cast<std::uint32_t*>(base + off);
    unsigned long long bad = 0;
    for (std::uint64_t i = threadIdx.x; i < words; i += blockDim.x) {
        const std::uint32_t want = pattern(off / 4 + i, salt);
        if (check) {
            bad += p[i] != want ? 1 : 0;
        } else {
            p[i] = want;
        }
    }
    if (bad != 0) {
        atomicAdd(mismatches, bad);
    }
}

/// The live blocks' pieces of a cache, on the device, for pattern_kernel.
struct device_pieces {
    std::uint64_t* offsets = nullptr;
    std::uint64_t* sizes = nullptr;
    unsigned long long* mismatches = nullptr;
    unsigned count = 0;
    template <class Cache>
    explicit device_pieces(const Cache& c) {
        std::vector<std::uint64_t> off, size;
        std::vector<std::int32_t> blocks;
        for (const auto& [id, s] : c.sequence_map()) {
            blocks.insert(blocks.end(), s.blocks.begin(), s.blocks.end());
        }
        std::sort(blocks.begin(), blocks.end());
        blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
        for (std::int32_t b : blocks) {
            Cache::layout_type::for_each_piece(c.geometry(), static_cast<std::uint32_t>(b),
                                               [&](std::size_t o, std::size_t n) {
                                                   off.push_back(o);
                                                   size.push_back(n);
                                               });
        }
        count = static_cast<unsigned>(off.size());
        cuda_check(cudaMalloc(&offsets, off.size() * 8));
        cuda_check(cudaMalloc(&sizes, size.size() * 8));
        cuda_check(cudaMalloc(&mismatches, sizeof(unsigned long long)));
        cuda_check(cudaMemcpy(offsets, off.data(), off.size() * 8, cudaMemcpyHostToDevice));
        cuda_check(cudaMemcpy(sizes, size.data(), size.size() * 8, cudaMemcpyHostToDevice));
    }
    ~device_pieces() {
        cudaFree(offsets);
        cudaFree(sizes);
        cudaFree(mismatches);
    }
    void fill(std::byte* base, std::uint32_t salt) const {
        pattern_kernel<<<count, 256>>>(base, offsets, sizes, salt, false, mismatches);
        cuda_check(cudaGetLastError());
        cuda_check(cudaDeviceSynchronize());
    }
    unsigned long long check(std::byte* base, std::uint32_t salt) const {
        cuda_check(cudaMemset(mismatches, 0, sizeof(unsigned long long)));
        pattern_kernel<<<count, 256>>>(base, offsets, sizes, salt, true, mismatches);
        cuda_check(cudaGetLastError());
        unsigned long long n = 0;
        cuda_check(cudaMemcpy(&n, mismatches, sizeof n, cudaMemcpyDeviceToHost));
        return n;
    }
};

/// Pinned host memory (cudaMallocHost), freed when it goes.
struct pinned {
    std::byte* data = nullptr;
    std::size_t bytes = 0;
    explicit pinned(std::size_t n) : bytes(n) { cuda_check(cudaMallocHost(reinterpret_cast<void**>(&data), n)); }
    ~pinned() { cudaFreeHost(data); }
    std::span<std::byte> span() const { return {data, bytes}; }
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// GB/s of one cudaMemcpyAsync of `bytes` from `src` to `dst` on `stream` (events).
double copy_gbps(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
    cudaEvent_t a, b;
    cuda_check(cudaEventCreate(&a));
    cuda_check(cudaEventCreate(&b));
    cuda_check(cudaEventRecord(a, stream));
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
    cuda_check(cudaEventRecord(b, stream));
    cuda_check(cudaEventSynchronize(b));
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

std::string list(const std::vector<double>& v) {
    std::string s = "[";
    for (std::size_t i = 0; i < v.size(); ++i) {
        char t[32];
        std::snprintf(t, sizeof t, "%s%.6g", i ? "," : "", v[i]);
        s += t;
    }
    return s + "]";
}
double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

template <class Layout>
using cache_t = vmmpp::kv_cache<vmmpp::elastic_config, Layout>;

/// A cache of `sequences` x `tokens` on its own budget, filled with the pattern.
template <class Layout>
std::unique_ptr<cache_t<Layout>> filled_cache(vmmpp::budget& b, const vmmpp::kv_geometry& g, std::size_t sequences,
                                              std::size_t tokens) {
    auto c = std::make_unique<cache_t<Layout>>(g, vmmpp::vmm_options{}, vmmpp::elastic_config::growth_type{},
                                               b.register_model("m", b.stats().limit));
    for (std::size_t i = 0; i < sequences; ++i) {
        (void)c->append(c->add_sequence(), tokens);
    }
    return c;
}

} // namespace

BOOST_AUTO_TEST_SUITE(gpu_kv_sleep)

// Layer-major: 64 regions, so many ranges and pieces; 1 GiB of blocks, a fork sharing them.
BOOST_AUTO_TEST_CASE(layer_major_data_survives_sleep_and_wake) {
    constexpr vmmpp::kv_geometry g{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                   .block_tokens = 16, .max_blocks = 1024};
    vmmpp::budget b(4 * GiB);
    auto c = filled_cache<vmmpp::layer_major>(b, g, 8, 16 * 63 + 5);  // partial last blocks
    (void)c->fork(c->sequence_map().begin()->first);
    const device_pieces pieces(*c);
    std::byte* base = c->pool().base();
    pieces.fill(base, 0x1234);
    const std::size_t committed = c->pool().committed_bytes();
    pinned host(c->sleep_bytes());
    const std::size_t free_before = free_device_bytes();
    const vmmpp::sleep_result s = c->sleep(host.span());
    BOOST_TEST(s.pool_bytes == committed);
    BOOST_TEST(c->pool().committed_bytes() == 0u);
    BOOST_TEST(free_device_bytes() >= free_before + committed - 64 * MiB);  // the pages really went back
    BOOST_TEST(b.stats().committed == 0u);
    (void)c->wake();
    BOOST_TEST(c->pool().base() == base);
    BOOST_TEST(c->pool().committed_bytes() >= host.bytes);  // the growth policy decides the rest
    BOOST_TEST(pieces.check(base, 0x1234) == 0u);
}

// 8 GiB of block-major KV (Llama-8B-like blocks of 2 MiB): correctness, and the measurement.
BOOST_AUTO_TEST_CASE(sleep_and_wake_8_gib_against_the_copy_floor) {
    constexpr vmmpp::kv_geometry g{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                   .block_tokens = 16, .max_blocks = 4608};
    constexpr std::size_t kv_bytes = 8 * GiB;
    constexpr int reps = 3;
    vmmpp::budget b(16 * GiB);
    auto c = filled_cache<vmmpp::block_major>(b, g, 64, 1024);  // 64 x 64 blocks of 2 MiB
    BOOST_REQUIRE(c->used_blocks() * g.block_bytes() == kv_bytes);
    const device_pieces pieces(*c);
    std::byte* base = c->pool().base();
    pieces.fill(base, 0xabcd);
    pinned host(c->sleep_bytes());
    BOOST_REQUIRE(host.bytes == kv_bytes);
    cudaStream_t stream;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    // The floor: the same bytes between a cudaMalloc buffer and the same pinned buffer.
    std::vector<double> d2h, h2d;
    {
        void* dev = nullptr;
        cuda_check(cudaMalloc(&dev, kv_bytes));
        (void)copy_gbps(host.data, dev, kv_bytes, stream);  // warm-up (first touch of the mapping)
        for (int i = 0; i < reps; ++i) {
            d2h.push_back(copy_gbps(host.data, dev, kv_bytes, stream));
            h2d.push_back(copy_gbps(dev, host.data, kv_bytes, stream));
        }
        cuda_check(cudaFree(dev));
    }

    std::vector<double> sleep_s, wake_s, sleep_driver_s, wake_driver_s, sleep_decommits, wake_commits;
    std::vector<double> free_gain;
    unsigned long long mismatches = 0;
    std::size_t ranges = 0;
    for (int i = 0; i < reps; ++i) {
        const std::size_t committed = c->pool().committed_bytes();
        const std::size_t free_awake = free_device_bytes();
        vmmpp::pool_stats before = c->pool().stats();
        auto t0 = std::chrono::steady_clock::now();
        const vmmpp::sleep_result s = c->sleep(host.span(), stream);
        sleep_s.push_back(seconds_since(t0));
        sleep_driver_s.push_back(std::chrono::duration<double>(c->pool().stats().driver_time - before.driver_time).count());
        sleep_decommits.push_back(static_cast<double>(c->pool().stats().decommits - before.decommits));
        ranges = s.ranges;
        BOOST_TEST(s.bytes_copied == kv_bytes);
        BOOST_TEST(s.pool_bytes == committed);
        BOOST_TEST(c->pool().committed_bytes() == 0u);
        free_gain.push_back(static_cast<double>(free_device_bytes()) - static_cast<double>(free_awake));
        BOOST_TEST(free_gain.back() >= static_cast<double>(kv_bytes - 64 * MiB));

        before = c->pool().stats();
        t0 = std::chrono::steady_clock::now();
        const vmmpp::sleep_result w = c->wake(stream);
        wake_s.push_back(seconds_since(t0));
        wake_driver_s.push_back(std::chrono::duration<double>(c->pool().stats().driver_time - before.driver_time).count());
        wake_commits.push_back(static_cast<double>(c->pool().stats().commits - before.commits));
        BOOST_TEST(w.bytes_copied == kv_bytes);
        BOOST_TEST(c->pool().base() == base);
        const unsigned long long bad = pieces.check(base, 0xabcd);
        mismatches += bad;
        BOOST_TEST(bad == 0u);
    }
    cuda_check(cudaStreamDestroy(stream));

    const double floor_sleep = static_cast<double>(kv_bytes) / (median(d2h) * 1e9);
    const double floor_wake = static_cast<double>(kv_bytes) / (median(h2d) * 1e9);
    std::printf("kv sleep/wake, %zu GiB (%zu ranges): sleep p50 %.3f s (copy floor %.3f s, %.2fx), wake p50 %.3f s "
                "(floor %.3f s, %.2fx); d2h %.1f GB/s, h2d %.1f GB/s\n",
                kv_bytes >> 30, ranges, median(sleep_s), floor_sleep, median(sleep_s) / floor_sleep, median(wake_s),
                floor_wake, median(wake_s) / floor_wake, median(d2h), median(h2d));
    if (const char* path = std::getenv("VMMPP_SLEEP_JSON")) {
        cudaDeviceProp prop{};
        cuda_check(cudaGetDeviceProperties(&prop, 0));
        std::ofstream out(path);
        out << "{\"device\":\"" << prop.name << "\",\"config\":\"elastic_config\",\"layout\":\"block_major\","
            << "\"kv_bytes\":" << kv_bytes << ",\"blocks\":" << c->used_blocks() << ",\"block_bytes\":"
            << g.block_bytes() << ",\"ranges\":" << ranges << ",\"reps\":" << reps << ",\"sleep_s\":" << list(sleep_s)
            << ",\"wake_s\":" << list(wake_s) << ",\"sleep_driver_s\":" << list(sleep_driver_s)
            << ",\"wake_driver_s\":" << list(wake_driver_s) << ",\"sleep_decommits\":" << list(sleep_decommits)
            << ",\"wake_commits\":" << list(wake_commits) << ",\"d2h_GBps\":" << list(d2h)
            << ",\"h2d_GBps\":" << list(h2d) << ",\"sleep_copy_floor_s\":" << floor_sleep
            << ",\"wake_copy_floor_s\":" << floor_wake << ",\"sleep_over_floor\":" << median(sleep_s) / floor_sleep
            << ",\"wake_over_floor\":" << median(wake_s) / floor_wake << ",\"device_free_gain_bytes\":"
            << list(free_gain) << ",\"mismatches\":" << mismatches << "}\n";
        BOOST_TEST(out.good());
    }
}

BOOST_AUTO_TEST_SUITE_END()
