// Stream order on the GPU: memory is never unmapped under work that may still use it. A kernel
// still reads a sequence's blocks when the engine frees the sequence; the cache's own
// copy-on-write copy is still queued when its source's sequence is freed; a pool range is
// released while a kernel reads it. Each must end with the right data and no CUDA error, on every
// GPU configuration, even when the engine then asks for memory back at once (trim).
#define VMMPP_GPU_TEST_NAME "gpu stream order"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"
#include "support/gpu_kv.hpp"

#include <boost/mpl/list.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"

using namespace vmmpp_test;

namespace {

using gpu_kv_cases =
    boost::mpl::list<kv_case<vmmpp::elastic_config>, kv_case<vmmpp::elastic_config, vmmpp::block_major>,
                     kv_case<vmmpp::elastic_mapped_ahead_config, vmmpp::block_major>, kv_case<vmmpp::static_config>,
                     kv_case<vmmpp::gh200_config>, kv_case<vmm_chunked_config, vmmpp::block_major>>;

// Llama-3-8B-like: 32 layers, 8 heads of 128, bf16, 16 tokens. A K or V piece is 32 KiB; in
// block_major a block is exactly one 2 MiB page, so a block's last reference takes its page.
constexpr vmmpp::kv_geometry geom{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                  .block_tokens = 16, .max_blocks = 128};
constexpr std::size_t piece_bytes = 16 * 8 * 128 * 2;

/// Spins for `cycles` clock cycles (the work an engine's step still has queued), then sums every
/// byte of the pieces into *sum.
__global__ void spin_then_sum(const unsigned char* const* pieces, int n_pieces, std::size_t bytes, long long cycles,
                              unsigned long long* sum) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
    unsigned long long local = 0;
    for (int p = blockIdx.x; p < n_pieces; p += gridDim.x) {
        for (std::size_t i = threadIdx.x; i < bytes; i += blockDim.x) {
            local += pieces[p][i];
        }
    }
    atomicAdd(sum, local);
}

/// Only spins: keeps a stream busy so that what is queued after it waits.
__global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

/// About 300 ms of spinning at the device's clock.
long long spin_cycles() {
    int khz = 0;
    cuda_check(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    return static_cast<long long>(khz) * 300;
}

/// Whether the configuration ever gives memory back (then the pages must wait for the GPU).
template <class Config>
constexpr bool gives_memory_back = Config::growth_type::is_elastic;
template <class Config>
constexpr bool has_mapper = vmmpp::elastic_pool<Config>::has_mapper;

/// A cache of the case's configuration whose own device work runs on `stream`.
template <class Case>
struct cache_on_stream {
    using config = typename Case::config;
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<typename Case::cache> cache;
    explicit cache_on_stream(cudaStream_t stream) {
        const vmmpp::kv_cache_options options{.stream = stream};
        using growth = typename config::growth_type;
        using backing_options = typename config::backing_type::options;
        if constexpr (std::is_same_v<typename config::quota_type, vmmpp::shared_budget>) {
            const std::size_t bytes = (geom.total_bytes() / page + 1) * page;
            budget = std::make_unique<vmmpp::budget>(bytes);
            cache = std::make_unique<typename Case::cache>(geom, backing_options{}, growth{},
                                                           budget->register_model("kv", bytes), options);
        } else {
            cache = std::make_unique<typename Case::cache>(geom, backing_options{}, growth{},
                                                           typename config::quota_type{}, options);
        }
    }
};


/// A kernel still at work on `pieces` when the test frees them: it spins ~300 ms on `stream`,
/// then sums every byte of them; sum() waits for it.
class slow_reader {
public:
    slow_reader(const std::vector<unsigned char*>& pieces, std::size_t bytes, cudaStream_t stream) {
        cuda_check(cudaMalloc(&pieces_, pieces.size() * sizeof(void*)));
        cuda_check(cudaMalloc(&sum_, sizeof(unsigned long long)));
        cuda_check(cudaMemcpy(pieces_, pieces.data(), pieces.size() * sizeof(void*), cudaMemcpyHostToDevice));
        cuda_check(cudaMemsetAsync(sum_, 0, sizeof(unsigned long long), stream));
        spin_then_sum<<<64, 256, 0, stream>>>(pieces_, static_cast<int>(pieces.size()), bytes, spin_cycles(), sum_);
        cuda_check(cudaGetLastError());
    }
    slow_reader(const slow_reader&) = delete;
    slow_reader& operator=(const slow_reader&) = delete;
    ~slow_reader() {
        (void)cudaFree(pieces_);
        (void)cudaFree(sum_);
    }
    [[nodiscard]] unsigned long long sum() const {
        unsigned long long sum = 0;
        cuda_check(cudaMemcpy(&sum, sum_, sizeof(sum), cudaMemcpyDeviceToHost));
        return sum;
    }

private:
    const unsigned char** pieces_ = nullptr;
    unsigned long long* sum_ = nullptr;
};


void check_stream(cudaStream_t stream) {
    cuda_check(cudaStreamSynchronize(stream));
    cuda_check(cudaGetLastError());
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(a_kernel_still_reading_a_freed_sequence_reads_it_whole, Case, gpu_kv_cases) {
    const test_stream owned_engine;
    const cudaStream_t engine = owned_engine.get();
    {
        cache_on_stream<Case> made(engine);
        auto& c = *made.cache;
        const auto s = c.add_sequence();
        c.append(s, 16 * 24);  // 24 blocks: several pages in every layout
        const auto pieces = pieces_of(c, s);
        for (auto* p : pieces) {
            cuda_check(cudaMemsetAsync(p, 3, piece_bytes, engine));
        }
        const slow_reader reader(pieces, piece_bytes, engine);

        c.free(s, engine);     // while the kernel runs: must not unmap under it
        (void)c.pool().trim();  // nor when the engine asks for everything back at once
        (void)c.collect();
        if constexpr (gives_memory_back<typename Case::config>) {
            BOOST_TEST(c.pool().stats().awaiting_gpu_units > 0u);  // still committed: the kernel is on it
        }
        check_stream(engine);
        BOOST_TEST(reader.sum() == 3ull * piece_bytes * pieces.size());
        (void)c.pool().trim();  // the kernel is done: now it all goes back
        if constexpr (gives_memory_back<typename Case::config>) {
            BOOST_TEST(c.pool().stats().awaiting_gpu_units == 0u);
            if constexpr (!has_mapper<typename Case::config>) {  // a mapper may be mapping ahead again
                BOOST_TEST(c.pool().committed_bytes() == 0u);
            }
        }
    }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(fork_append_free_parent_keeps_the_queued_copy_source, Case, gpu_kv_cases) {
    const test_stream owned_cache_stream;
    const cudaStream_t cache_stream = owned_cache_stream.get();
    {
        cache_on_stream<Case> made(cache_stream);
        auto& c = *made.cache;
        const auto parent = c.add_sequence();
        c.append(parent, 20);  // its second block is partial
        for (auto* p : pieces_of(c, parent)) {
            cuda_check(cudaMemset(p, 0x5a, piece_bytes));
        }
        const auto child = c.fork(parent);
        spin<<<1, 1, 0, cache_stream>>>(spin_cycles());  // the copy-on-write copy queues behind this
        cuda_check(cudaGetLastError());
        c.append(child, 1);  // copies the shared partial block on cache_stream, later
        BOOST_TEST(c.cow_copies() == 1u);
        c.free(parent);         // the copy's source loses its last reference
        (void)c.pool().trim();  // and the engine asks for every spare back
        check_stream(cache_stream);
        const auto table = c.block_table(child);
        BOOST_REQUIRE(table.size() == 2u);
        std::vector<unsigned char> host(piece_bytes);
        std::size_t bad = 0;
        for (std::uint32_t l = 0; l < geom.layers; ++l) {
            for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
                cuda_check(cudaMemcpy(host.data(), c.address(l, part, table[1]), piece_bytes, cudaMemcpyDeviceToHost));
                for (unsigned char v : host) {
                    bad += v != 0x5a;
                }
            }
        }
        BOOST_TEST(bad == 0u, bad << " bytes of the copied block differ from its source");
        c.free(child);
    }
}

BOOST_AUTO_TEST_CASE(pool_release_on_a_stream_waits_for_the_kernel) {
    const test_stream owned_engine;
    const cudaStream_t engine = owned_engine.get();
    {
        vmmpp::budget budget(64 * page);
        vmmpp::elastic_pool<vmmpp::elastic_page_config> pool(64 * page, {}, {}, budget.register_model("m", 64 * page));
        pool.ensure_committed(0, 8 * page);
        cuda_check(cudaMemsetAsync(pool.base(), 1, 8 * page, engine));
        std::vector<unsigned char*> pieces;
        for (std::size_t i = 0; i < 8; ++i) {
            pieces.push_back(reinterpret_cast<unsigned char*>(pool.base() + i * page));
        }
        const slow_reader reader(pieces, page, engine);
        pool.release(0, 8 * page, engine);
        BOOST_TEST(pool.trim() == 0u);  // nothing may go back yet
        BOOST_TEST(pool.committed_bytes() == 8 * page);
        BOOST_TEST(budget.stats().committed == 8 * page);  // still charged
        check_stream(engine);
        BOOST_TEST(reader.sum() == 8ull * page);
        // Done: the release agent gives it back without a call (or this collect, if it comes first).
        (void)pool.collect();
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(1);
        while (pool.committed_bytes() != 0 && std::chrono::steady_clock::now() < give_up) {
        }
        BOOST_TEST(pool.committed_bytes() == 0u);
        BOOST_TEST(budget.stats().committed == 0u);
    }
}
