// bench_kv_release: what freeing a sequence costs the engine's thread, and how long until its
// memory is back on the device, now that memory goes back only after the GPU work queued before
// the free has completed. A Llama-3-8B-like cache (32 layers, 8 KV heads of 128, bf16, 16-token
// blocks); a 2,048-token sequence (128 blocks, 256 MiB) is freed while the GPU is idle.
//   free_us:  the free() call itself (the engine's critical path)
//   back_us:  from the free() call until the pool has given every page back (free, then
//             collect() until nothing is committed; without collect(), as the free returns)
// free_sequence_gpu_busy frees while 1.5 ms of work queued before the free still runs.
// The floor is the raw driver: cuMemUnmap + cuMemRelease of the same 128 pages through the vmm
// backing alone, measured in the same run (raw_release_us); ratios are against it.
// The same source builds against headers without stream-ordered release (no collect()), so the
// before and after binaries measure the same thing.
#include <chrono>

#include "common.hpp"
#include "vmmpp/kv/cache.hpp"

namespace {

using namespace vmmpp_bench;
using clock_type = std::chrono::steady_clock;

constexpr vmmpp::kv_geometry geometry{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                      .block_tokens = 16, .max_blocks = 512};
constexpr std::size_t sequence_tokens = 2048;

template <class Config, class Layout>
struct kv_case {
    using cache = vmmpp::kv_cache<Config, Layout>;
    using config = Config;
};

template <class Case>
std::unique_ptr<typename Case::cache> make_cache(benchmark::State& state) {
    using config = typename Case::config;
    if constexpr (std::is_same_v<typename config::quota_type, vmmpp::shared_budget>) {
        vmmpp::budget budget(std::size_t{4} << 30);
        return make_or_skip<typename Case::cache, true>(state, geometry, typename config::backing_type::options{},
                                                        typename config::growth_type{},
                                                        budget.register_model("bench", std::size_t{4} << 30));
    } else {
        return make_or_skip<typename Case::cache, true>(state, geometry);
    }
}

/// A new 2,048-token sequence, the GPU idle after it; not timed.
template <class Cache>
vmmpp::seq_id add_sequence_untimed(benchmark::State& state, Cache& cache) {
    state.PauseTiming();
    const auto seq = cache.add_sequence();
    cache.append(seq, sequence_tokens);
    vmmpp::driver::check(::cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    state.ResumeTiming();
    return seq;
}

/// Frees a 2,048-token sequence (rebuilt untimed each iteration) and times the call and the
/// return of its memory.
template <class Case>
void free_sequence(benchmark::State& state) {
    auto cache = make_cache<Case>(state);
    if (!cache) {
        return;
    }
    init_cuda_runtime();
    samples free_us(state), back_us(state);
    for (auto _ : state) {
        const auto seq = add_sequence_untimed(state, *cache);
        const auto start = clock_type::now();
        cache->free(seq);
        const auto freed = clock_type::now();
        if constexpr (requires { cache->collect(); }) {
            if constexpr (Case::config::growth_type::is_elastic &&
                          !vmmpp::elastic_pool<typename Case::config>::has_mapper) {
                while (cache->pool().committed_bytes() != 0) {
                    (void)cache->collect();
                }
            }
        }
        const auto back = clock_type::now();
        free_us.add(std::chrono::duration<double>(freed - start).count());
        back_us.add(std::chrono::duration<double>(back - start).count());
    }
    free_us.report(state, "free_us", 1e6);
    back_us.report(state, "back_us", 1e6);
}

/// The same free while the GPU is still busy with work queued before it on the engine's stream (a
/// memset of 4 GiB, about 1.5 ms on an H100): free(seq, stream) returns without waiting, and the
/// memory comes back once that work is done. Headers without free(seq, stream) skip it: there
/// the pages would be unmapped under the queued work.
template <class Case>
void free_sequence_gpu_busy(benchmark::State& state) {
    if constexpr (!requires(typename Case::cache& c, vmmpp::seq_id s, cudaStream_t st) { c.free(s, st); }) {
        state.SkipWithError("no free(seq, stream) in these headers");
    } else {
        auto cache = make_cache<Case>(state);
        if (!cache) {
            return;
        }
        init_cuda_runtime();
        constexpr std::size_t scratch_bytes = std::size_t{4} << 30;
        void* scratch = nullptr;
        vmmpp::driver::check(::cudaMalloc(&scratch, scratch_bytes), "cudaMalloc(scratch)");
        cudaStream_t stream = nullptr;
        vmmpp::driver::check(::cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        samples free_us(state), back_us(state);
        for (auto _ : state) {
            const auto seq = add_sequence_untimed(state, *cache);
            vmmpp::driver::check(::cudaMemsetAsync(scratch, 1, scratch_bytes, stream), "cudaMemsetAsync");
            const auto start = clock_type::now();
            cache->free(seq, stream);
            const auto freed = clock_type::now();
            while (cache->pool().committed_bytes() != 0) {
                (void)cache->collect();
            }
            const auto back = clock_type::now();
            free_us.add(std::chrono::duration<double>(freed - start).count());
            back_us.add(std::chrono::duration<double>(back - start).count());
        }
        vmmpp::driver::check(::cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        (void)::cudaStreamDestroy(stream);
        (void)::cudaFree(scratch);
        free_us.report(state, "free_us", 1e6);
        back_us.report(state, "back_us", 1e6);
    }
}

/// The raw floor: decommit (cuMemUnmap + cuMemRelease) of 128 2 MiB pages on the vmm backing,
/// committed again untimed.
void raw_release_128_pages(benchmark::State& state) {
    constexpr std::size_t page = std::size_t{2} << 20;
    auto b = make_or_skip<vmmpp::vmm, true>(state, 128 * page);
    if (!b) {
        return;
    }
    samples raw_us(state);
    for (auto _ : state) {
        state.PauseTiming();
        for (std::size_t i = 0; i < 128; ++i) {
            b->commit(i * page, page);
        }
        state.ResumeTiming();
        const auto start = clock_type::now();
        for (std::size_t i = 0; i < 128; ++i) {
            b->decommit(i * page, page);
        }
        raw_us.add(std::chrono::duration<double>(clock_type::now() - start).count());
    }
    raw_us.report(state, "raw_release_us", 1e6);
}

using elastic_layer = kv_case<vmmpp::elastic_config, vmmpp::layer_major>;
using elastic_block = kv_case<vmmpp::elastic_config, vmmpp::block_major>;
using static_layer = kv_case<vmmpp::static_config, vmmpp::layer_major>;

BENCHMARK(raw_release_128_pages)->Iterations(20)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(free_sequence, elastic_layer)->Name("free_sequence/elastic_config/layer_major")->Iterations(20)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(free_sequence, elastic_block)->Name("free_sequence/elastic_config/block_major")->Iterations(20)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(free_sequence_gpu_busy, elastic_layer)->Name("free_sequence_gpu_busy/elastic_config/layer_major")->Iterations(20)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(free_sequence_gpu_busy, elastic_block)->Name("free_sequence_gpu_busy/elastic_config/block_major")->Iterations(20)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(free_sequence, static_layer)->Name("free_sequence/static_config/layer_major")->Iterations(20)->Unit(benchmark::kMicrosecond);

} // namespace

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
