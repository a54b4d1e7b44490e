// bench/bench_host_tier_gpu.cu: the host tier's copies against the pinned copy floor, and a decode
// step's time while the tier moves data at full rate (issue 30), in one run.
//
// Geometry as Llama-3-8B: 32 layers, 8 KV heads of 128, bf16, 16-token blocks: a block_major
// block is 2 MiB (one piece), a layer_major block 64 pieces of 32 KiB (each layer's K and V).
// Copies move 256 blocks (512 MiB) with every other id, so no two blocks merge into one piece:
//   floor/{d2h,h2d,both}      one cudaMemcpyAsync of 512 MiB between cudaMalloc and
//                             cudaHostAlloc memory (both: one each way at once, two streams);
//   copy_blocks/<layout>/...  copy_blocks between an elastic_config cache and a pinned_host_config
//                             cache of the same layout (one cudaMemcpyBatchAsync of its pieces);
//   copy_blocks/layer_major_staged/...  the same to a blocks_contiguous<layer_major> host cache:
//                             the pieces gathered through a staging buffer, a DMA per block;
//   tier/{offload,onload}/<layout>  the host tier's own paths: 256 cached blocks evicted into it
//                             (prefix_cache::clear -> host_tier::spill), and a prompt of 256
//                             blocks attached back from it (host_tier::attach), each to completion.
// GB/s = bytes moved / time between events around the calls (manual time).
//
//   decode/<traffic>          a memory-bound decode step: every K and V byte of 2048 blocks
//                             (4 GiB) read once, one launch per layer, as a paged attention step;
//                             its per-step time (events, 200 steps) alone, and while 20 GiB of tier
//                             copies a way are queued on low-priority streams (traffic, below),
//                             then alone again. Counters: p50_ms, p99_ms, and copy_busy (1 if the
//                             copies were still running when the last step ended: the steps were
//                             measured under the traffic).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "common.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/blocks_contiguous.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/tier/host_tier.hpp"

namespace {

using namespace vmmpp_bench;
using vmmpp::driver::check;

constexpr vmmpp::kv_geometry geometry(std::uint32_t max_blocks) {
    return {.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16, .block_tokens = 16,
            .max_blocks = max_blocks};
}
constexpr std::size_t block_bytes = std::size_t{2} << 20;
constexpr std::size_t piece_bytes = 32u << 10;
constexpr std::size_t copy_blocks_n = 256;
constexpr std::uint32_t gpu_blocks = 8192;  // 16 GiB of span (committed as used)
constexpr std::size_t budget_bytes = std::size_t{24} << 30;

/// Streams and events of one measurement.
struct timing {
    cudaStream_t a = nullptr, b = nullptr;
    cudaEvent_t start = nullptr, stop = nullptr;
    timing() {
        int low = 0, high = 0;
        check(cudaDeviceGetStreamPriorityRange(&low, &high), "cudaDeviceGetStreamPriorityRange");
        check(cudaStreamCreateWithPriority(&a, cudaStreamNonBlocking, low), "cudaStreamCreateWithPriority");
        check(cudaStreamCreateWithPriority(&b, cudaStreamNonBlocking, low), "cudaStreamCreateWithPriority");
        check(cudaEventCreate(&start), "cudaEventCreate");
        check(cudaEventCreate(&stop), "cudaEventCreate");
    }
    ~timing() {
        (void)cudaStreamDestroy(a);
        (void)cudaStreamDestroy(b);
        (void)cudaEventDestroy(start);
        (void)cudaEventDestroy(stop);
    }
    /// Seconds of the work queued by `queue` on stream a (and b, which waits for a's start and
    /// which a waits for at the end).
    template <class F>
    double seconds(F&& queue) {
        check(cudaEventRecord(start, a), "cudaEventRecord");
        check(cudaStreamWaitEvent(b, start, 0), "cudaStreamWaitEvent");
        queue();
        cudaEvent_t b_done = nullptr;
        check(cudaEventCreateWithFlags(&b_done, cudaEventDisableTiming), "cudaEventCreate");
        check(cudaEventRecord(b_done, b), "cudaEventRecord");
        check(cudaStreamWaitEvent(a, b_done, 0), "cudaStreamWaitEvent");
        check(cudaEventRecord(stop, a), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "cudaEventSynchronize");
        (void)cudaEventDestroy(b_done);
        float ms = 0;
        check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        return ms / 1e3;
    }
};

void report(benchmark::State& state, double seconds, std::size_t bytes) {
    state.SetIterationTime(seconds);
    state.counters["GBps"] =
        benchmark::Counter(static_cast<double>(bytes) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// --- the floor ---------------------------------------------------------------------------------

void BM_floor(benchmark::State& state, int direction) {  // 0 d2h, 1 h2d, 2 both
    const std::size_t bytes = copy_blocks_n * block_bytes;
    void *dev = nullptr, *dev2 = nullptr, *host = nullptr, *host2 = nullptr;
    check(cudaMalloc(&dev, bytes), "cudaMalloc");
    check(cudaMalloc(&dev2, bytes), "cudaMalloc");
    check(cudaHostAlloc(&host, bytes, cudaHostAllocDefault), "cudaHostAlloc");
    check(cudaHostAlloc(&host2, bytes, cudaHostAllocDefault), "cudaHostAlloc");
    timing t;
    for (auto _ : state) {
        const double s = t.seconds([&] {
            if (direction != 1) {
                check(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, t.a), "cudaMemcpyAsync");
            }
            if (direction != 0) {
                check(cudaMemcpyAsync(dev2, host2, bytes, cudaMemcpyHostToDevice, direction == 2 ? t.b : t.a),
                      "cudaMemcpyAsync");
            }
        });
        report(state, s, direction == 2 ? 2 * bytes : bytes);
    }
    (void)cudaFree(dev);
    (void)cudaFree(dev2);
    (void)cudaFreeHost(host);
    (void)cudaFreeHost(host2);
}

// --- copy_blocks between a GPU cache and pinned host memory ---------------------------------------

template <class Layout, class HostLayout = Layout>
void BM_copy_blocks(benchmark::State& state, int direction) {
    using gpu_t = vmmpp::kv_cache<vmmpp::elastic_config, Layout>;
    using host_t = vmmpp::kv_cache<vmmpp::pinned_host_config, HostLayout>;
    vmmpp::budget budget{budget_bytes};
    gpu_t gpu{geometry(gpu_blocks), {}, {}, budget.register_model("kv", budget_bytes)};
    host_t host{geometry(static_cast<std::uint32_t>(2 * copy_blocks_n + 2))};
    // Every other id, so no two blocks merge: each block is its own piece(s), as an eviction's are.
    auto take_every_other = [](auto& cache, std::size_t n, cudaStream_t s) {
        std::vector<std::int32_t> all, kept;
        for (std::size_t i = 0; i < 2 * n; ++i) {
            all.push_back(cache.take_block(s));
        }
        for (std::size_t i = 0; i < all.size(); ++i) {
            if (i % 2 == 0) {
                kept.push_back(all[i]);
            } else {
                cache.release_block(all[i]);
            }
        }
        return kept;
    };
    timing t;
    const auto g1 = take_every_other(gpu, copy_blocks_n, t.a);
    const auto h1 = take_every_other(host, copy_blocks_n / 2, t.a);
    const auto h2 = take_every_other(host, copy_blocks_n / 2, t.a);
    std::vector<std::int32_t> hosts(h1);
    hosts.insert(hosts.end(), h2.begin(), h2.end());
    const auto g2 = take_every_other(gpu, copy_blocks_n, t.a);
    std::vector<std::int32_t> hosts_b(hosts.rbegin(), hosts.rend());  // another order, same blocks
    for (auto _ : state) {
        const double s = t.seconds([&] {
            if (direction != 1) {
                vmmpp::copy_blocks(gpu, std::span<const std::int32_t>(g1), host, std::span<const std::int32_t>(hosts), t.a);
            }
            if (direction != 0) {
                vmmpp::copy_blocks(host, std::span<const std::int32_t>(direction == 2 ? hosts_b : hosts), gpu,
                                   std::span<const std::int32_t>(g2), direction == 2 ? t.b : t.a);
            }
        });
        report(state, s, (direction == 2 ? 2 : 1) * copy_blocks_n * block_bytes);
    }
}

// --- the tier's own paths ---------------------------------------------------------------------

template <class Layout>
void BM_tier(benchmark::State& state, bool onload) {
    using gpu_t = vmmpp::kv_cache<vmmpp::elastic_config, Layout>;
    using prefix_t = vmmpp::prefix_cache<gpu_t>;
    vmmpp::budget budget{budget_bytes};
    gpu_t gpu{geometry(gpu_blocks), {}, {}, budget.register_model("kv", budget_bytes)};
    prefix_t prefix{gpu};
    timing t;
    vmmpp::host_tier<prefix_t> tier{prefix, {.max_blocks = copy_blocks_n + 8, .stream = t.a}};
    std::vector<std::int32_t> tokens(copy_blocks_n * 16);
    std::iota(tokens.begin(), tokens.end(), 1);
    std::size_t round = 0;
    for (auto _ : state) {
        tokens[0] = static_cast<std::int32_t>(1000000 + round++);  // a new prompt each round: all misses
        const auto s = tier.attach(tokens, {}, t.a);
        prefix.append(s.seq, tokens.size() - s.cached_tokens, t.a);
        prefix.publish(s.seq, tokens);
        prefix.free(s.seq, t.a);
        check(cudaStreamSynchronize(t.a), "cudaStreamSynchronize");
        double seconds = t.seconds([&] { (void)prefix.clear(); });  // spill: 256 blocks to the host
        if (onload) {
            tier.synchronize();
            vmmpp::tiered_sequence back{};
            seconds = t.seconds([&] {  // attach and its copies; the free after is the engine's
                back = tier.attach(tokens, {}, t.a);
                tier.stream_waits_for_copies(t.a);
            });
            if (back.host_tokens != tokens.size()) {
                state.SkipWithError("attach did not load the whole prompt from the host tier");
            }
            prefix.free(back.seq, t.a);
            (void)prefix.clear();
        }
        tier.synchronize();
        report(state, seconds, copy_blocks_n * block_bytes);
    }
    state.counters["offloaded"] = static_cast<double>(tier.stats().offloaded_blocks);
    state.counters["loaded"] = static_cast<double>(tier.stats().loaded_blocks);
}

// --- a decode step under tier traffic -----------------------------------------------------------

/// One layer of a paged decode step's reads: CTA i reads block table[i]'s K and V of `layer`
/// (32 KiB each, 16-byte loads) and adds them up.
__global__ void decode_layer(const std::byte* base, std::size_t block_stride, std::size_t layer_offset,
                             const std::int32_t* table, unsigned long long* out) {
    const std::byte* k = base + static_cast<std::size_t>(table[blockIdx.x]) * block_stride + layer_offset;
    const uint4* kv = reinterpret_cast<const uint4*>(k);
    unsigned long long acc = 0;
    for (unsigned i = threadIdx.x; i < 2 * piece_bytes / 16; i += blockDim.x) {
        const uint4 v = kv[i];
        acc += v.x + v.y + v.z + v.w;
    }
    if (acc == 0x123456789ull) {  // never: keeps the loads
        *out = acc;
    }
}

/// The tier traffic under a decode step: none; the tier's copies (copy_blocks: one batch each way
/// per round, queued up front) one way or both; both ways as plain cudaMemcpyAsync per block, or
/// as batches with the driver's overlap-with-compute hint (what the tier could do instead); or
/// paced: `paced_blocks` blocks queued per decode step (an engine's per-step budget, as
/// host_tier::store_ahead takes) one way or both.
enum class traffic { none, d2h, h2d, both, both_plain, both_hint, paced_d2h, paced_h2d, paced_both };

void BM_decode(benchmark::State& state, traffic kind, std::size_t paced_blocks) {
    using gpu_t = vmmpp::kv_cache<vmmpp::elastic_config, vmmpp::block_major>;
    using prefix_t = vmmpp::prefix_cache<gpu_t>;
    constexpr std::size_t read_blocks = 2048, steps = 200, traffic_rounds = 40;
    const bool paced = kind == traffic::paced_d2h || kind == traffic::paced_h2d || kind == traffic::paced_both;
    vmmpp::budget budget{budget_bytes};
    gpu_t gpu{geometry(gpu_blocks), {}, {}, budget.register_model("kv", budget_bytes)};
    prefix_t prefix{gpu};
    cudaStream_t compute = nullptr;
    int low = 0, high = 0;
    check(cudaDeviceGetStreamPriorityRange(&low, &high), "cudaDeviceGetStreamPriorityRange");
    check(cudaStreamCreateWithPriority(&compute, cudaStreamNonBlocking, high), "cudaStreamCreateWithPriority");
    timing t;  // its streams (low priority) carry the tier's traffic
    vmmpp::host_tier<prefix_t> tier{prefix, {.max_blocks = 2 * copy_blocks_n + 8, .stream = t.a}};

    const vmmpp::seq_id reader = gpu.add_sequence();
    gpu.append(reader, read_blocks * 16, compute);
    const auto table = gpu.block_table(reader);
    std::int32_t* dtable = nullptr;
    unsigned long long* dout = nullptr;
    check(cudaMalloc(&dtable, read_blocks * sizeof(std::int32_t)), "cudaMalloc");
    check(cudaMalloc(&dout, sizeof(unsigned long long)), "cudaMalloc");
    check(cudaMemcpy(dtable, table.data(), read_blocks * sizeof(std::int32_t), cudaMemcpyHostToDevice), "cudaMemcpy");
    // The traffic's blocks: 256 GPU blocks copied to and from host blocks, over and over.
    const vmmpp::seq_id moved = gpu.add_sequence();
    gpu.append(moved, copy_blocks_n * 16, compute);
    const std::vector<std::int32_t> moved_blocks(gpu.block_table(moved).begin(), gpu.block_table(moved).end());
    std::vector<std::int32_t> host_out, host_in;
    auto& host = const_cast<typename decltype(tier)::host_cache_type&>(tier.host_cache());
    for (std::size_t i = 0; i < copy_blocks_n; ++i) {
        host_out.push_back(host.take_block(t.a));
        host_in.push_back(host.take_block(t.a));
    }
    const vmmpp::seq_id landing = gpu.add_sequence();
    gpu.append(landing, copy_blocks_n * 16, compute);
    const std::vector<std::int32_t> landing_blocks(gpu.block_table(landing).begin(), gpu.block_table(landing).end());
    check(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
    // Raw pointers of the same blocks, for the plain and hinted variants.
    std::vector<void*> out_to, in_to;
    std::vector<const void*> out_from, in_from;
    std::vector<std::size_t> sizes(copy_blocks_n, block_bytes);
    for (std::size_t i = 0; i < copy_blocks_n; ++i) {
        out_from.push_back(gpu.key(0, moved_blocks[i]));
        out_to.push_back(host.key(0, host_out[i]));
        in_from.push_back(host.key(0, host_in[i]));
        in_to.push_back(gpu.key(0, landing_blocks[i]));
    }
    auto queue = [&](std::size_t first, std::size_t n, bool out, bool in) {
        const std::span<const std::int32_t> g_out(moved_blocks.data() + first, n), h_out(host_out.data() + first, n),
            h_in(host_in.data() + first, n), g_in(landing_blocks.data() + first, n);
        if (kind == traffic::both_plain) {
            for (std::size_t i = first; i < first + n; ++i) {
                check(cudaMemcpyAsync(out_to[i], out_from[i], block_bytes, cudaMemcpyDeviceToHost, t.a), "cudaMemcpyAsync");
                check(cudaMemcpyAsync(in_to[i], in_from[i], block_bytes, cudaMemcpyHostToDevice, t.b), "cudaMemcpyAsync");
            }
        } else if (kind == traffic::both_hint) {
            cudaMemcpyAttributes a{};
            a.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
            a.flags = cudaMemcpyFlagPreferOverlapWithCompute;
            std::size_t first_attr = 0;
            check(cudaMemcpyBatchAsync(out_to.data() + first, out_from.data() + first, sizes.data(), n, &a, &first_attr, 1, t.a),
                  "cudaMemcpyBatchAsync");
            check(cudaMemcpyBatchAsync(in_to.data() + first, in_from.data() + first, sizes.data(), n, &a, &first_attr, 1, t.b),
                  "cudaMemcpyBatchAsync");
        } else {
            if (out) {
                vmmpp::copy_blocks(gpu, g_out, host, h_out, t.a);
            }
            if (in) {
                vmmpp::copy_blocks(host, h_in, gpu, g_in, t.b);
            }
        }
    };
    const bool out = kind != traffic::h2d && kind != traffic::paced_h2d;
    const bool in = kind != traffic::d2h && kind != traffic::paced_d2h;

    cudaEvent_t e0 = nullptr, e1 = nullptr, copies_done = nullptr, b_done = nullptr;
    check(cudaEventCreate(&e0), "cudaEventCreate");
    check(cudaEventCreate(&e1), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&copies_done, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&b_done, cudaEventDisableTiming), "cudaEventCreate");
    const auto& base_geom = gpu.geometry();
    const std::size_t stride = vmmpp::block_major::block_stride_bytes(base_geom);
    auto step = [&] {
        for (std::uint32_t l = 0; l < base_geom.layers; ++l) {
            const std::size_t layer_offset = static_cast<std::size_t>(gpu.key(l, 0) - gpu.key(0, 0));
            decode_layer<<<read_blocks, 256, 0, compute>>>(gpu.key(0, 0), stride, layer_offset, dtable, dout);
        }
    };
    for (int i = 0; i < 5; ++i) {
        step();  // warm
    }
    check(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
    for (auto _ : state) {
        if (kind != traffic::none && !paced) {  // queue the traffic first
            for (std::size_t r = 0; r < traffic_rounds; ++r) {
                queue(0, copy_blocks_n, out, in);
            }
        }
        check(cudaEventRecord(b_done, t.b), "cudaEventRecord");  // copies_done: both ways' copies
        check(cudaStreamWaitEvent(t.a, b_done, 0), "cudaStreamWaitEvent");
        check(cudaEventRecord(copies_done, t.a), "cudaEventRecord");
        std::vector<double> ms;
        for (std::size_t s = 0; s < steps; ++s) {
            if (paced) {
                queue((s * paced_blocks) % copy_blocks_n, paced_blocks, out, in);
            }
            check(cudaEventRecord(e0, compute), "cudaEventRecord");
            step();
            check(cudaEventRecord(e1, compute), "cudaEventRecord");
            check(cudaEventSynchronize(e1), "cudaEventSynchronize");
            float m = 0;
            check(cudaEventElapsedTime(&m, e0, e1), "cudaEventElapsedTime");
            ms.push_back(m);
        }
        const bool busy = kind != traffic::none && !paced && cudaEventQuery(copies_done) == cudaErrorNotReady;
        (void)cudaGetLastError();
        check(cudaStreamSynchronize(t.a), "cudaStreamSynchronize");
        check(cudaStreamSynchronize(t.b), "cudaStreamSynchronize");
        std::sort(ms.begin(), ms.end());
        const double total = std::accumulate(ms.begin(), ms.end(), 0.0);
        state.SetIterationTime(total / 1e3);
        state.counters["p50_ms"] = ms[ms.size() / 2];
        state.counters["p99_ms"] = ms[ms.size() * 99 / 100];
        state.counters["copy_busy"] = busy ? 1 : 0;
        state.counters["read_GBps"] =
            static_cast<double>(read_blocks * block_bytes) / (ms[ms.size() / 2] / 1e3) / 1e9;
        if (paced) {  // bytes moved per second of decode, both ways together
            state.counters["traffic_GBps"] = static_cast<double>((out && in ? 2 : 1) * steps * paced_blocks * block_bytes) /
                                             (total / 1e3) / 1e9;
        }
    }
    (void)cudaEventDestroy(e0);
    (void)cudaEventDestroy(e1);
    (void)cudaEventDestroy(copies_done);
    (void)cudaEventDestroy(b_done);
    (void)cudaFree(dtable);
    (void)cudaFree(dout);
    (void)cudaStreamDestroy(compute);
}

void register_all() {
    const char* dirs[] = {"d2h", "h2d", "both"};
    for (int d = 0; d < 3; ++d) {
        benchmark::RegisterBenchmark((std::string("floor/") + dirs[d]).c_str(), BM_floor, d)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
        benchmark::RegisterBenchmark((std::string("copy_blocks/block_major/") + dirs[d]).c_str(),
                                     BM_copy_blocks<vmmpp::block_major>, d)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
        benchmark::RegisterBenchmark((std::string("copy_blocks/layer_major/") + dirs[d]).c_str(),
                                     BM_copy_blocks<vmmpp::layer_major>, d)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
        benchmark::RegisterBenchmark((std::string("copy_blocks/layer_major_staged/") + dirs[d]).c_str(),
                                     BM_copy_blocks<vmmpp::layer_major, vmmpp::blocks_contiguous<vmmpp::layer_major>>, d)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
    }
    for (const bool onload : {false, true}) {
        const std::string way = onload ? "onload" : "offload";
        benchmark::RegisterBenchmark(("tier/" + way + "/block_major").c_str(), BM_tier<vmmpp::block_major>, onload)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
        benchmark::RegisterBenchmark(("tier/" + way + "/layer_major").c_str(), BM_tier<vmmpp::layer_major>, onload)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
    }
    const std::tuple<const char*, traffic, std::size_t> decode[] = {
        {"decode/alone", traffic::none, 0},
        {"decode/tier_d2h", traffic::d2h, 0},
        {"decode/tier_h2d", traffic::h2d, 0},
        {"decode/tier_both", traffic::both, 0},
        {"decode/plain_both", traffic::both_plain, 0},
        {"decode/hint_both", traffic::both_hint, 0},
        {"decode/paced_d2h/32", traffic::paced_d2h, 32},  // 64 MiB a step: about the full D2H rate
        {"decode/paced_h2d/8", traffic::paced_h2d, 8},
        {"decode/paced_h2d/16", traffic::paced_h2d, 16},
        {"decode/paced_h2d/32", traffic::paced_h2d, 32},
        {"decode/paced_both/8", traffic::paced_both, 8},
        {"decode/paced_both/16", traffic::paced_both, 16},
        {"decode/alone_again", traffic::none, 0}};
    for (const auto& [name, kind, blocks] : decode) {
        benchmark::RegisterBenchmark(name, BM_decode, kind, blocks)
            ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1)->Repetitions(3);
    }
}

} // namespace

int main(int argc, char** argv) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("bench_host_tier_gpu: no GPU, nothing to measure\n");
        return 0;
    }
    register_all();
    benchmark::Initialize(&argc, argv);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
