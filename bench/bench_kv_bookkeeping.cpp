// bench_kv_bookkeeping: what the KV cache's own bookkeeping costs an engine step, with memory
// out of the picture: appending a token that needs no new block, appending one that needs a new
// block whose memory is already committed, forking a 2,048-token sequence and freeing it, and a
// prompt's 4,096 tokens (256 blocks) appended at once, as a prefill or a host tier's onload does.
// Host memory only (CI runs it briefly so it keeps working); items per second.
#include <chrono>

#include "common.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"

namespace {

using namespace vmmpp_bench;
using clock_type = std::chrono::steady_clock;

/// Host pool committed up front: appends never touch the OS, only the cache's bookkeeping.
using host_committed_config = vmmpp::pool_config<vmmpp::host, vmmpp::preallocated, vmmpp::unlimited>;

template <class Config, class Layout>
struct kv_config {
    using cache = vmmpp::kv_cache<Config, Layout>;
};

// A Llama-3-8B-like geometry: 32 layers, 8 KV heads of 128, bf16, 16-token blocks.
constexpr vmmpp::kv_geometry geometry{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                      .block_tokens = 16, .max_blocks = 2048};

template <class Case>
std::unique_ptr<typename Case::cache> make_cache(benchmark::State& state) {
    return make_or_skip<typename Case::cache, false>(state, geometry);
}

void set_time(benchmark::State& state, clock_type::duration d) {
    state.SetIterationTime(std::chrono::duration<double>(d).count());
}

/// Fills a block one token at a time (15 appends, no new block), then truncates back untimed.
template <class Case>
void append_token_same_block(benchmark::State& state) {
    auto cache = make_cache<Case>(state);
    if (!cache) return;
    const auto seq = cache->add_sequence();
    cache->append(seq, 1);
    for (auto _ : state) {
        const auto start = clock_type::now();
        for (int i = 1; i < 16; ++i) {
            cache->append(seq, 1);
        }
        set_time(state, clock_type::now() - start);
        cache->truncate(seq, 1);
    }
    state.SetItemsProcessed(state.iterations() * 15);
}

/// 64 appends that each start a new block (memory already committed), then truncate untimed.
template <class Case>
void append_token_new_block(benchmark::State& state) {
    auto cache = make_cache<Case>(state);
    if (!cache) return;
    const auto seq = cache->add_sequence();
    for (auto _ : state) {
        const auto start = clock_type::now();
        for (int i = 0; i < 64; ++i) {
            cache->append(seq, 16);
        }
        set_time(state, clock_type::now() - start);
        cache->truncate(seq, 0);
    }
    state.SetItemsProcessed(state.iterations() * 64);
}

/// fork of a 2,048-token sequence (128 shared blocks); the child is freed untimed.
template <class Case>
void fork_2048(benchmark::State& state) {
    auto cache = make_cache<Case>(state);
    if (!cache) return;
    const auto seq = cache->add_sequence();
    cache->append(seq, 2048);
    for (auto _ : state) {
        const auto start = clock_type::now();
        const auto child = cache->fork(seq);
        set_time(state, clock_type::now() - start);
        cache->free(child);
    }
    state.SetItemsProcessed(state.iterations());
}

/// free of a 2,048-token sequence that owns its 128 blocks; it is rebuilt untimed.
template <class Case>
void free_2048(benchmark::State& state) {
    auto cache = make_cache<Case>(state);
    if (!cache) return;
    for (auto _ : state) {
        const auto seq = cache->add_sequence();
        cache->append(seq, 2048);
        const auto start = clock_type::now();
        cache->free(seq);
        set_time(state, clock_type::now() - start);
    }
    state.SetItemsProcessed(state.iterations());
}

/// One append of 4,096 tokens (256 new blocks, memory already committed); freed untimed. In
/// layer_major a block is 64 pieces: the append holds all 16,384 in one pool call, page by page
/// (one call per piece until 2026-12-07: 0.9-1.0 ms here, 0.06 ms since).
template <class Case>
void append_4096(benchmark::State& state) {
    auto cache = make_cache<Case>(state);
    if (!cache) return;
    for (auto _ : state) {
        const auto seq = cache->add_sequence();
        const auto start = clock_type::now();
        cache->append(seq, 4096);
        set_time(state, clock_type::now() - start);
        cache->free(seq);
    }
    state.SetItemsProcessed(state.iterations());
}

// Each benchmark in the NHD layouts of vmmpp::kv_layouts (block_major, kv_cache's default, and
// layer_major): <benchmark>/<layout>.
[[maybe_unused]] const bool registered = [] {
    vmmpp::for_each_type<vmmpp::nhd_kv_layouts>([]<class L>(std::type_identity<L>) {
        using c = kv_config<host_committed_config, L>;
        const std::string layout(vmmpp::type_name<L>);
        benchmark::RegisterBenchmark(("append_token_same_block/" + layout).c_str(), append_token_same_block<c>)
            ->UseManualTime();
        benchmark::RegisterBenchmark(("append_token_new_block/" + layout).c_str(), append_token_new_block<c>)
            ->UseManualTime();
        benchmark::RegisterBenchmark(("fork_2048/" + layout).c_str(), fork_2048<c>)->UseManualTime();
        benchmark::RegisterBenchmark(("free_2048/" + layout).c_str(), free_2048<c>)->UseManualTime();
        benchmark::RegisterBenchmark(("append_4096/" + layout).c_str(), append_4096<c>)->UseManualTime();
    });
    return true;
}();

} // namespace

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
