// The vmm backing's zero page on the GPU (vmm_options::unbacked): kernels read never-committed
// and decommitted address space and get zeros instead of faulting; a kernel reads a freed KV
// block's id (and one never committed) through a kv_cache and gets zeros; and what the option
// costs: device memory (cuMemGetInfo around the construction of large reservations) and growth
// time (commit and decommit of 2 MiB pages with and without it, interleaved in one run). The
// figures are printed, and written as JSON to $VMMPP_ZERO_PAGE_JSON when it is set.
#define VMMPP_GPU_TEST_NAME "gpu zero page"
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

using namespace vmmpp_test;

namespace {

/// 2 MiB growth, so a freed page goes back at once (the growth policy is not what is tested).
using page_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::shared_budget>;

/// Counts the nonzero 32-bit words of [p, p + n).
__global__ void count_nonzero(const unsigned* p, std::size_t n, unsigned long long* count) {
    unsigned long long mine = 0;
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        mine += p[i] != 0u;
    }
    if (mine != 0) {
        atomicAdd(count, mine);
    }
}

/// Counts the nonzero 16-bit values of the blocks `ids` of a KV tensor whose blocks are
/// `block_stride` elements apart, `block_elems` long: what a paged kernel reading a stale id does.
__global__ void count_nonzero_in_blocks(const std::uint16_t* k, long long block_stride, long long block_elems,
                                        const std::int32_t* ids, int n, unsigned long long* count) {
    const int b = blockIdx.x;
    if (b >= n) {
        return;
    }
    unsigned long long mine = 0;
    for (long long i = threadIdx.x; i < block_elems; i += blockDim.x) {
        mine += k[ids[b] * block_stride + i] != 0u;
    }
    if (mine != 0) {
        atomicAdd(count, mine);
    }
}

__global__ void write_word(unsigned* p, unsigned v) { *p = v; }

/// Nonzero words of [p, p + bytes), read by a kernel; the kernel must not fault.
unsigned long long nonzero_words(const void* p, std::size_t bytes) {
    unsigned long long* d = nullptr;
    cuda_check(cudaMalloc(&d, sizeof *d));
    cuda_check(cudaMemset(d, 0, sizeof *d));
    count_nonzero<<<264, 256>>>(static_cast<const unsigned*>(p), bytes / 4, d);
    cuda_check(cudaGetLastError());
    cuda_check(cudaDeviceSynchronize());
    unsigned long long h = 0;
    cuda_check(cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost));
    cuda_check(cudaFree(d));
    return h;
}

const char* name(vmmpp::unbacked_access a) {
    switch (a) {
    case vmmpp::unbacked_access::fault: return "fault";
    case vmmpp::unbacked_access::zeros: return "zeros";
    case vmmpp::unbacked_access::zeros_writable: return "zeros_writable";
    }
    return "?";
}

double percentile(std::vector<double> v, double q) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1))];
}

} // namespace

BOOST_AUTO_TEST_CASE(kernels_read_zeros_from_never_committed_and_decommitted_pages) {
    const std::size_t g = vmmpp::vmm_granularity(0);
    for (auto mode : {vmmpp::unbacked_access::zeros, vmmpp::unbacked_access::zeros_writable}) {
        BOOST_TEST_CONTEXT(name(mode)) {
            vmmpp::vmm b(64 * g, {.unbacked = mode});
            BOOST_TEST(b.zero_page_bytes() == g);
            BOOST_TEST(nonzero_words(b.base(), 64 * g) == 0u);  // nothing committed: all zeros, no fault
            b.commit(3 * g, 2 * g);
            b.commit(40 * g, g);
            cuda_check(cudaMemset(b.base() + 3 * g, 0xab, 2 * g));
            cuda_check(cudaMemset(b.base() + 40 * g, 0xcd, g));
            cuda_check(cudaDeviceSynchronize());
            BOOST_TEST(nonzero_words(b.base(), 64 * g) == 3 * g / 4);
            b.decommit(3 * g, 2 * g);
            BOOST_TEST(nonzero_words(b.base(), 64 * g) == g / 4);  // the decommitted pages read zeros
            b.decommit(40 * g, g);
            BOOST_TEST(nonzero_words(b.base(), 64 * g) == 0u);
            BOOST_TEST(b.unzeroed_bytes() == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(a_stray_write_to_the_writable_zero_page_is_harmless_but_seen_everywhere) {
    // Documented behaviour of zeros_writable: no fault, and the write lands in the shared page.
    // (A stray write to the read-only zero page faults: the fake-driver test shows it, here it
    // would end the process's context.)
    const std::size_t g = vmmpp::vmm_granularity(0);
    vmmpp::vmm b(8 * g, {.unbacked = vmmpp::unbacked_access::zeros_writable});
    write_word<<<1, 1>>>(reinterpret_cast<unsigned*>(b.base() + 2 * g + 64), 42u);
    cuda_check(cudaGetLastError());
    cuda_check(cudaDeviceSynchronize());
    unsigned seen = 0;
    cuda_check(cudaMemcpy(&seen, b.base() + 6 * g + 64, sizeof seen, cudaMemcpyDeviceToHost));
    BOOST_TEST(seen == 42u);
    BOOST_TEST(nonzero_words(b.base(), 8 * g) == 8u);  // one word, under each of the 8 pages
}

BOOST_AUTO_TEST_CASE(a_kernel_reading_a_freed_block_id_gets_zeros_instead_of_faulting) {
    // 32 KiB blocks: 64 to a 2 MiB page of each layer's K. The sequence fills page 0 of every
    // region; freeing it gives those pages back (once the stream's work is done).
    const vmmpp::kv_geometry geometry{.layers = 2, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 1024};
    vmmpp::budget budget(GiB);
    vmmpp::kv_cache<page_config, vmmpp::layer_major> cache(geometry, {.unbacked = vmmpp::unbacked_access::zeros}, {},
                                                 budget.register_model("m", GiB));
    const auto seq = cache.add_sequence();
    cache.append(seq, 64 * 16);
    const auto table = cache.block_table(seq);
    std::vector<std::int32_t> ids(table.begin(), table.end());
    ids.push_back(static_cast<std::int32_t>(geometry.max_blocks - 1));  // never committed
    const vmmpp::kv_tensor k = cache.tensor(1, vmmpp::kv_part::key);
    const long long block_stride = k.strides[0];
    const auto block_elems = static_cast<long long>(geometry.block_tensor_bytes() / 2);
    std::int32_t* d_ids = nullptr;
    cuda_check(cudaMalloc(&d_ids, ids.size() * sizeof(std::int32_t)));
    cuda_check(cudaMemcpy(d_ids, ids.data(), ids.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    unsigned long long* d_count = nullptr;
    cuda_check(cudaMalloc(&d_count, sizeof *d_count));
    auto count = [&] {
        cuda_check(cudaMemset(d_count, 0, sizeof *d_count));
        count_nonzero_in_blocks<<<static_cast<unsigned>(ids.size()), 256>>>(
            static_cast<const std::uint16_t*>(k.data), block_stride, block_elems, d_ids, static_cast<int>(ids.size()), d_count);
        cuda_check(cudaGetLastError());
        cuda_check(cudaDeviceSynchronize());
        unsigned long long h = 0;
        cuda_check(cudaMemcpy(&h, d_count, sizeof h, cudaMemcpyDeviceToHost));
        return h;
    };
    for (std::int32_t b : table) {
        cuda_check(cudaMemset(cache.key(1, b), 0x3c, static_cast<std::size_t>(block_elems) * 2));
    }
    cuda_check(cudaDeviceSynchronize());
    BOOST_TEST(count() == static_cast<unsigned long long>(table.size() * block_elems));
    cache.free(seq);
    cuda_check(cudaDeviceSynchronize());
    cache.collect();
    BOOST_TEST(cache.pool().committed_bytes() == 0u);
    BOOST_TEST(count() == 0u);  // the freed ids and the never-committed one read zeros
    cuda_check(cudaFree(d_ids));
    cuda_check(cudaFree(d_count));
}

BOOST_AUTO_TEST_CASE(cost_of_the_zero_page) {
    using clock = std::chrono::steady_clock;
    const std::size_t g = vmmpp::vmm_granularity(0);
    // The read-only zero page is the one measured; should this driver refuse read-only mappings,
    // that is an error here and the writable one is measured instead, so the figures still come.
    vmmpp::unbacked_access zeros = vmmpp::unbacked_access::zeros;
    std::string refused = "null";
    try {
        vmmpp::vmm probe(g, {.unbacked = zeros});
    } catch (const vmmpp::cuda_error& e) {
        BOOST_ERROR("the read-only zero page was refused: " << e.what());
        refused = "\"" + std::string(e.call()) + "\"";
        zeros = vmmpp::unbacked_access::zeros_writable;
    }
    std::string json = "{\n  \"granularity\": " + std::to_string(g) + ",\n  \"read_only_refused_by\": " + refused +
                       ",\n  \"memory\": [\n";
    // Memory: free device memory before and after building a reservation of each size, with
    // and without the zero page (the zero page itself, plus whatever the driver spends on
    // mapping it under every page: page tables).
    bool first = true;
    for (std::size_t gib : {std::size_t{4}, std::size_t{64}}) {
        for (auto mode : {vmmpp::unbacked_access::fault, zeros}) {
            cuda_check(cudaDeviceSynchronize());
            const std::size_t before = free_device_bytes();
            const auto t0 = clock::now();
            std::size_t after = 0;
            double build_ms = 0;
            {
                vmmpp::vmm b(gib * GiB, {.unbacked = mode});
                build_ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
                after = free_device_bytes();
            }
            const auto used = static_cast<long long>(before) - static_cast<long long>(after);
            std::printf("reservation %zu GiB, %s: device memory used %lld bytes, construction %.1f ms\n", gib,
                        name(mode), used, build_ms);
            json += std::string(first ? "" : ",\n") + "    {\"reserved_gib\": " + std::to_string(gib) +
                    ", \"unbacked\": \"" + name(mode) + "\", \"device_bytes_used\": " + std::to_string(used) +
                    ", \"construction_ms\": " + std::to_string(build_ms) + "}";
            first = false;
            if (mode != vmmpp::unbacked_access::fault) {
                BOOST_TEST(used >= static_cast<long long>(g));  // at least the zero page
            }
        }
    }
    // Growth: commit then decommit `pages` single 2 MiB pages, each call timed; the two modes
    // alternate over `rounds` so drift hits both alike.
    constexpr int rounds = 4;
    constexpr std::size_t pages = 128;
    std::vector<double> commit_us[2], decommit_us[2];
    const vmmpp::unbacked_access modes[2] = {vmmpp::unbacked_access::fault, zeros};
    for (int r = 0; r < rounds; ++r) {
        for (int m = 0; m < 2; ++m) {
            vmmpp::vmm b(pages * g * 4, {.unbacked = modes[m]});
            for (std::size_t i = 0; i < pages; ++i) {
                const auto t0 = clock::now();
                b.commit(i * 4 * g, g);  // every 4th page: each commit is its own handle and mapping
                commit_us[m].push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count());
            }
            for (std::size_t i = 0; i < pages; ++i) {
                const auto t0 = clock::now();
                b.decommit(i * 4 * g, g);
                decommit_us[m].push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count());
            }
        }
    }
    json += "\n  ],\n  \"growth_per_2MiB_page_us\": [\n";
    for (int m = 0; m < 2; ++m) {
        const double c50 = percentile(commit_us[m], 0.5), c99 = percentile(commit_us[m], 0.99);
        const double d50 = percentile(decommit_us[m], 0.5), d99 = percentile(decommit_us[m], 0.99);
        std::printf("%s: commit p50 %.1f us p99 %.1f us; decommit p50 %.1f us p99 %.1f us (%zu each)\n",
                    name(modes[m]), c50, c99, d50, d99, commit_us[m].size());
        json += std::string(m == 0 ? "" : ",\n") + "    {\"unbacked\": \"" + name(modes[m]) +
                "\", \"commit_p50\": " + std::to_string(c50) + ", \"commit_p99\": " + std::to_string(c99) +
                ", \"decommit_p50\": " + std::to_string(d50) + ", \"decommit_p99\": " + std::to_string(d99) +
                ", \"samples\": " + std::to_string(commit_us[m].size()) + "}";
    }
    // Larger handles: 32 MiB (16 pages, chunked<16>) per commit; the zero page's cost is per
    // page (one cuMemUnmap each on commit, one cuMemMap each on decommit), the rest per handle.
    constexpr std::size_t chunk_pages = 16, chunks = 16;
    std::vector<double> chunk_commit_us[2], chunk_decommit_us[2];
    for (int r = 0; r < rounds; ++r) {
        for (int m = 0; m < 2; ++m) {
            vmmpp::vmm b(chunks * chunk_pages * g * 2, {.unbacked = modes[m]});
            for (std::size_t i = 0; i < chunks; ++i) {
                const auto t0 = clock::now();
                b.commit(i * 2 * chunk_pages * g, chunk_pages * g);
                chunk_commit_us[m].push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count());
            }
            for (std::size_t i = 0; i < chunks; ++i) {
                const auto t0 = clock::now();
                b.decommit(i * 2 * chunk_pages * g, chunk_pages * g);
                chunk_decommit_us[m].push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count());
            }
        }
    }
    json += "\n  ],\n  \"growth_per_32MiB_handle_us\": [\n";
    for (int m = 0; m < 2; ++m) {
        const double c50 = percentile(chunk_commit_us[m], 0.5), d50 = percentile(chunk_decommit_us[m], 0.5);
        std::printf("%s, 32 MiB handles: commit p50 %.1f us; decommit p50 %.1f us (%zu each)\n", name(modes[m]), c50,
                    d50, chunk_commit_us[m].size());
        json += std::string(m == 0 ? "" : ",\n") + "    {\"unbacked\": \"" + name(modes[m]) +
                "\", \"commit_p50\": " + std::to_string(c50) + ", \"decommit_p50\": " + std::to_string(d50) +
                ", \"samples\": " + std::to_string(chunk_commit_us[m].size()) + "}";
    }
    json += "\n  ]\n}\n";
    if (const char* path = std::getenv("VMMPP_ZERO_PAGE_JSON"); path != nullptr && *path != '\0') {
        std::ofstream(path) << json;
        std::printf("wrote %s\n", path);
    }
    BOOST_TEST(commit_us[1].size() == rounds * pages);
}
