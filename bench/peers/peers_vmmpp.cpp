// bench/peers/peers_vmmpp.cpp: the C++ half of the peer benchmark (issue 16). Every vmmpp
// configuration under test, in each KV layout, against floors measured in the same run: the raw
// driver (cuMemCreate + cuMemMap + cuMemSetAccess, 2 MiB and 32 MiB handles) and a
// cudaMallocAsync pool (cudaMallocFromPoolAsync of 2 MiB, release threshold at its maximum).
// bench/peers/peers_torch.py measures the Python peers (PyTorch, kvcached) the same way and
// bench/peers/summarize.py prints the table of the issue from both.
//
// Geometry (the issue's): 32 layers, 8 KV heads of 128, bf16, 16 tokens per block, so one block
// is 2 MiB over all layers. "A call" is the call that takes a block: kv_cache::append of the
// tokens that need one new block, timed alone with steady_clock.
//
//   grow/<subject>       0 -> 8 GiB, one new block per call, unpaced (a fresh cache)
//   paced/<subject>      the same at 20 GB/s (spinning between calls), started a quiet
//                        release_delay after the cache was filled and emptied once
//   steady/<subject>     ~4 GiB live in one-block sequences: free a random one (untimed), take
//                        one, many times
//   burst/<subject>      16 GiB admitted at once: 64 sequences of 256 MiB, one append each;
//                        GB/s of the whole burst
//   memory/<subject>     8 GiB grown, everything freed: device bytes held at once and after
//                        release_delay + 100 ms with no call; back_pct, idle_bytes
//   churn/<subject>      40 sequences of lognormal lengths (median 665 tokens, sigma 0.88: about
//                        4.8 GiB live), one freed and one admitted per step: held / live bytes
//   churn_host/<subject> the same pool logic over the host backing (4,000 steps x scale; runs on CPU)
//   bandwidth/<subject>  cudaMemcpyAsync D2D over the cache's committed ranges against the same
//                        copies over cudaMalloc memory
//   engine/<subject>     GPU time of 64 small copies on an engine's stream, idle and while
//                        another thread grows the cache at 20 GB/s
//
// Subjects: <configuration>/<layout> for every entry of `peer_configs` x `peer_layouts`: every
// GPU configuration of vmmpp::named_configs (vmmpp/config_list.hpp) and the extra ones listed
// here, in the NHD layouts of vmmpp::kv_layouts (vmmpp/kv/layout_list.hpp), and the floors raw_driver_2MiB, raw_driver_32MiB,
// cudaMallocAsync_pool. Sizes scale with VMMPP_PEERS_SCALE (default 1; `run --quick` passes
// 0.5); VMMPP_PEERS_CHURN_STEPS and VMMPP_PEERS_HOST_CHURN_STEPS set the churn lengths. Managed
// memory (gh200_config) never exceeds 8 GiB x scale. Counters are in microseconds (_us), bytes
// (_bytes) or as named. The program exits 1 if any benchmark failed (a skip for want of a GPU
// is not a failure).
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/handles.hpp"
#include "vmmpp/config_list.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"

namespace vmmpp_peers {

using namespace vmmpp_bench;
using clock_type = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// What is measured: one line per configuration, one per layout.

/// A string usable as a template argument: a subject's name.
template <std::size_t N>
struct fixed_string {
    char chars[N]{};
    constexpr fixed_string(const char (&s)[N]) { std::copy_n(s, N, chars); }  // NOLINT(google-explicit-constructor)
};

/// A configuration under test and the name it goes by in the results.
template <class Config, fixed_string Name>
struct peer {
    using config = Config;
    static std::string name() { return Name.chars; }
};

/// A named configuration (vmmpp::named_configs), under the name the results have always used:
/// its type's, "elastic_config" for vmmpp::elastic_config.
template <class Config>
struct named_peer {
    using config = Config;
    static std::string name() { return std::string(vmmpp::type_name<Config>) + "_config"; }
};
template <class Config>
struct as_named_peer {
    using type = named_peer<Config>;
};

/// Every configuration the benchmark measures: the named GPU configurations, then the extra ones
/// (add one with one line).
using peer_configs = vmmpp::apply_t<
    vmmpp::concat_t<vmmpp::transform_t<vmmpp::device_named_configs, as_named_peer>,
                    vmmpp::type_list<peer<vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<16>, vmmpp::shared_budget>,
                                          "pool_config<vmm,chunked<16>,shared_budget>">>>,
    std::tuple>;

/// A KV layout under test and its name (kv_cache's default layout is marked in the results).
template <class Layout>
struct layout_entry {
    using layout = Layout;
    static std::string name() { return std::string(vmmpp::type_name<Layout>); }
};
template <class Layout>
struct as_layout_entry {
    using type = layout_entry<Layout>;
};

/// Every layout each configuration is measured in: the NHD ones of vmmpp::kv_layouts,
/// block_major (kv_cache's default) and layer_major.
using peer_layouts = vmmpp::apply_t<vmmpp::transform_t<vmmpp::nhd_kv_layouts, as_layout_entry>, std::tuple>;

/// Whether `Layout` is what kv_cache<Config> uses when given none.
template <class Config, class Layout>
inline constexpr bool is_default_layout = std::is_same_v<typename vmmpp::kv_cache<Config>::layout_type, Layout>;

// ---------------------------------------------------------------------------------------------
// Sizes

/// The sizes times VMMPP_PEERS_SCALE.
struct sizes {
    double scale = 1.0;
    std::size_t grow_bytes = 0;      ///< grow, paced, memory, bandwidth, engine
    std::size_t burst_bytes = 0;     ///< burst
    std::size_t steady_bytes = 0;    ///< live bytes of the steady mix
    std::size_t steady_calls = 0;
    std::size_t managed_cap = 0;     ///< most bytes a managed-memory cache may span
    std::size_t churn_steps = 0;     ///< churn on the configuration's own backing
    std::size_t host_churn_steps = 0;
};

inline std::size_t env_size(const char* name, std::size_t fallback) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 10) : fallback;
}

inline const sizes& the_sizes() {
    static const sizes s = [] {
        sizes r;
        const char* v = std::getenv("VMMPP_PEERS_SCALE");
        r.scale = v != nullptr && *v != '\0' ? std::strtod(v, nullptr) : 1.0;
        if (!(r.scale > 0.0) || r.scale > 4.0) {
            throw std::invalid_argument("VMMPP_PEERS_SCALE must lie in (0, 4]");
        }
        const auto scaled = [&](std::size_t bytes) {
            const auto b = static_cast<std::size_t>(static_cast<double>(bytes) * r.scale);
            return std::max<std::size_t>(b / (256 * MiB) * (256 * MiB), 256 * MiB);  // whole 256 MiB sequences
        };
        r.grow_bytes = scaled(8 * GiB);
        r.burst_bytes = scaled(16 * GiB);
        r.steady_bytes = scaled(4 * GiB);
        r.managed_cap = scaled(8 * GiB);
        r.steady_calls = std::max<std::size_t>(static_cast<std::size_t>(4000 * r.scale), 100);
        r.churn_steps = env_size("VMMPP_PEERS_CHURN_STEPS", static_cast<std::size_t>(1000 * r.scale));
        r.host_churn_steps = env_size("VMMPP_PEERS_HOST_CHURN_STEPS", std::max<std::size_t>(static_cast<std::size_t>(4000 * r.scale), 200));
        return r;
    }();
    return s;
}

/// The model: 32 layers, 8 KV heads of 128, bf16, 16-token blocks (2 MiB a block).
inline vmmpp::kv_geometry geometry(std::size_t max_blocks) {
    return vmmpp::kv_geometry{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                              .block_tokens = 16, .max_blocks = static_cast<std::uint32_t>(max_blocks)};
}
constexpr std::size_t block_tokens = 16;
constexpr std::size_t block_bytes = 2 * MiB;
constexpr double paced_GBps = 20.0;
constexpr auto quiet_margin = std::chrono::milliseconds(100);

/// Time between two calls that each take one 2 MiB block, for `GBps` of growth.
inline std::chrono::nanoseconds pacing_interval(double GBps) {
    return std::chrono::nanoseconds(static_cast<std::int64_t>(static_cast<double>(block_bytes) / GBps));
}

// ---------------------------------------------------------------------------------------------
// Results

/// Benchmarks that failed (not skipped for want of a GPU): main's exit status.
inline std::atomic<int> failures{0};

inline void fail(benchmark::State& state, const std::string& what) {
    ++failures;
    state.SkipWithError(what.c_str());
}

/// Per-call latencies, reported as p50 / p99 / p99.9 / mean / max in microseconds.
class latencies {
public:
    void reserve(std::size_t n) { us_.reserve(n); }
    void add(clock_type::duration d) { us_.push_back(std::chrono::duration<double, std::micro>(d).count()); }
    [[nodiscard]] double total_seconds() const {
        double s = 0;
        for (double v : us_) {
            s += v;
        }
        return s * 1e-6;
    }
    void report(benchmark::State& state, const std::string& prefix = "") {
        if (us_.empty()) {
            return;
        }
        std::vector<double> v = us_;
        std::sort(v.begin(), v.end());
        const auto at = [&](double q) { return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))]; };
        state.counters[prefix + "p50_us"] = at(0.50);
        state.counters[prefix + "p99_us"] = at(0.99);
        state.counters[prefix + "p999_us"] = at(0.999);
        state.counters[prefix + "max_us"] = v.back();
        state.counters[prefix + "mean_us"] = total_seconds() * 1e6 / static_cast<double>(v.size());
        state.counters[prefix + "calls"] = static_cast<double>(v.size());
    }

private:
    std::vector<double> us_;
};

/// Times one call of `f` into `into`.
template <class F>
decltype(auto) timed(latencies& into, F&& f) {
    const auto t0 = clock_type::now();
    if constexpr (std::is_void_v<decltype(f())>) {
        std::forward<F>(f)();
        into.add(clock_type::now() - t0);
    } else {
        auto r = std::forward<F>(f)();
        into.add(clock_type::now() - t0);
        return r;
    }
}

/// Spins until `t`: the engine's step, on a thread that stays busy feeding the GPU.
inline void spin_until(clock_type::time_point t) {
    while (clock_type::now() < t) {
    }
}

// ---------------------------------------------------------------------------------------------
// Building caches

template <class Config>
inline constexpr bool is_managed = needs_gpu<Config> && vmmpp::has_property<typename Config::backing_type, vmmpp::host_accessible>;

/// The same configuration over the host backing (same growth, quota and mutex): the pool logic
/// of `Config` on CPU memory, for churn on a machine without a GPU.
template <class Config>
using host_twin = vmmpp::pool_config<vmmpp::host, typename Config::growth_type, typename Config::quota_type,
                                     typename Config::mutex_type>;

/// How long after its last use an idle cache of `Config` is meant to have given memory back:
/// the growth policy's release_delay where it has one, else 0 (plus the margin callers add).
template <class Config>
std::chrono::milliseconds release_delay() {
    typename Config::growth_type g{};
    if constexpr (requires { g.release_delay; }) {
        return std::chrono::duration_cast<std::chrono::milliseconds>(g.release_delay);
    } else {
        return std::chrono::milliseconds(0);
    }
}

/// Blocks a cache of `Config` may have: `wanted`, or fewer where managed memory is capped.
template <class Config>
std::size_t block_cap(std::size_t wanted) {
    if constexpr (is_managed<Config>) {
        return std::min(wanted, the_sizes().managed_cap / block_bytes);
    } else {
        return wanted;
    }
}

/// A kv_cache of `Config` and `Layout` with `max_blocks` blocks, as shipped: the growth policy's
/// defaults; a shared_budget of its own whose limits leave the cache's whole span free.
template <class Config, class Layout>
std::unique_ptr<vmmpp::kv_cache<Config, Layout>> make_cache(std::size_t max_blocks) {
    using cache = vmmpp::kv_cache<Config, Layout>;
    const vmmpp::kv_geometry g = geometry(max_blocks);
    if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
        const std::size_t limit = 2 * g.total_bytes() + GiB;  // never the limit: rounding, spares
        vmmpp::budget budget(limit);
        return std::make_unique<cache>(g, typename Config::backing_type::options{}, typename Config::growth_type{},
                                       budget.register_model("peers", limit));
    } else {
        return std::make_unique<cache>(g);
    }
}

/// Device (or host) bytes a cache's pool holds: committed plus handles kept for reuse.
template <class Cache>
std::size_t held_bytes(const Cache& c) {
    const auto s = c.pool().stats();
    return s.committed + s.cached_bytes;
}

template <class Cache>
void report_pool(benchmark::State& state, const Cache& c, const vmmpp::pool_stats& before) {
    const auto s = c.pool().stats();
    state.counters["sync_commits"] = static_cast<double>(s.sync_commits - before.sync_commits);
    state.counters["mapper_commits"] = static_cast<double>(s.mapper_commits - before.mapper_commits);
    state.counters["waits"] = static_cast<double>(s.waits - before.waits);
}

/// True (and the benchmark skipped) when it needs a GPU this machine lacks; else makes the
/// runtime's context current when it needs one.
inline bool no_gpu(benchmark::State& state, bool gpu) {
    if (gpu && !has_gpu()) {
        state.SkipWithError("no CUDA device");
        return true;
    }
    if (gpu) {
        init_cuda_runtime();
    }
    return false;
}

/// Runs `body`, turning an exception into a failed benchmark.
template <class F>
void guarded(benchmark::State& state, F&& body) {
    try {
        for (auto _ : state) {
            std::forward<F>(body)();
        }
    } catch (const std::exception& e) {
        fail(state, e.what());
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios on a vmmpp cache

/// 0 -> grow_bytes, one new block per call, unpaced; or paced at `GBps` after a fill, an
/// emptying and a quiet release_delay (Paced).
template <class Config, class Layout, bool Paced>
void scenario_grow(benchmark::State& state) {
    if (no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] {
        const std::size_t n = block_cap<Config>(the_sizes().grow_bytes / block_bytes);
        auto c = make_cache<Config, Layout>(n);
        if constexpr (Paced) {
            const auto all = c->add_sequence();
            c->append(all, n * block_tokens);
            c->free(all);
            std::this_thread::sleep_for(release_delay<Config>() + quiet_margin);
        } else {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));  // a mapper fills its spares
        }
        const auto seq = c->add_sequence();
        const auto before = c->pool().stats();
        latencies calls;
        calls.reserve(n);
        const auto interval = pacing_interval(paced_GBps);
        const auto start = clock_type::now();
        auto next = start;
        for (std::size_t i = 0; i < n; ++i) {
            if constexpr (Paced) {
                spin_until(next);
                next += interval;
            }
            timed(calls, [&] { return c->append(seq, block_tokens); });
        }
        const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        calls.report(state);
        report_pool(state, *c, before);
        state.counters["achieved_GBps"] = static_cast<double>(n * block_bytes) / seconds / 1e9;
        state.counters["asked_GBps"] = Paced ? paced_GBps : 0.0;
        state.counters["grown_bytes"] = static_cast<double>(n * block_bytes);
    });
}

/// ~steady_bytes live in one-block sequences; each call frees a random one and takes one block
/// for a new sequence. Only the append is on the reported latency; the free has its own.
template <class Config, class Layout>
void scenario_steady(benchmark::State& state) {
    if (no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] {
        const std::size_t live = block_cap<Config>(the_sizes().steady_bytes / block_bytes);
        auto c = make_cache<Config, Layout>(live + 64);
        std::vector<vmmpp::seq_id> seqs(live);
        for (auto& s : seqs) {
            s = c->add_sequence();
            c->append(s, block_tokens);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        std::mt19937_64 rng(16);
        std::uniform_int_distribution<std::size_t> pick(0, live - 1);
        latencies calls;
        latencies frees;
        const auto before = c->pool().stats();
        for (std::size_t i = 0; i < the_sizes().steady_calls; ++i) {
            auto& slot = seqs[pick(rng)];
            timed(frees, [&] { c->free(slot); });
            slot = c->add_sequence();
            timed(calls, [&] { return c->append(slot, block_tokens); });
        }
        calls.report(state);
        frees.report(state, "free_");
        report_pool(state, *c, before);
        state.counters["live_bytes"] = static_cast<double>(live * block_bytes);
    });
}

/// burst_bytes admitted at once: sequences of 256 MiB (2,048 tokens), one append each.
template <class Config, class Layout>
void scenario_burst(benchmark::State& state) {
    if (no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] {
        const std::size_t seq_blocks = 256 * MiB / block_bytes;
        const std::size_t n_seqs = block_cap<Config>(the_sizes().burst_bytes / block_bytes) / seq_blocks;
        auto c = make_cache<Config, Layout>(n_seqs * seq_blocks);
        std::vector<vmmpp::seq_id> seqs(n_seqs);
        for (auto& s : seqs) {
            s = c->add_sequence();
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        latencies calls;
        const auto before = c->pool().stats();
        const auto start = clock_type::now();
        for (auto s : seqs) {
            timed(calls, [&] { return c->append(s, seq_blocks * block_tokens); });
        }
        const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        calls.report(state);
        report_pool(state, *c, before);
        state.counters["burst_bytes"] = static_cast<double>(n_seqs * seq_blocks * block_bytes);
        state.counters["burst_GBps"] = static_cast<double>(n_seqs * seq_blocks * block_bytes) / seconds / 1e9;
    });
}

/// grow_bytes held, then everything freed: bytes held at once, and after release_delay + 100 ms
/// in which nothing calls the cache.
template <class Config, class Layout>
void scenario_memory(benchmark::State& state) {
    if (no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] {
        const std::size_t n = block_cap<Config>(the_sizes().grow_bytes / block_bytes);
        auto c = make_cache<Config, Layout>(n);
        const auto seq = c->add_sequence();
        c->append(seq, n * block_tokens);
        if constexpr (needs_gpu<Config>) {
            vmmpp::driver::check(::cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        }
        const std::size_t held = held_bytes(*c);
        const auto t0 = clock_type::now();
        c->free(seq);
        const auto free_call = clock_type::now() - t0;
        const std::size_t at_once = held_bytes(*c);
        const auto wait = release_delay<Config>() + quiet_margin;
        std::this_thread::sleep_for(wait);
        const std::size_t after = held_bytes(*c);
        const auto pct = [&](std::size_t now) {
            return held == 0 ? 0.0 : 100.0 * static_cast<double>(held - std::min(held, now)) / static_cast<double>(held);
        };
        state.counters["held_before_bytes"] = static_cast<double>(held);
        state.counters["held_at_once_bytes"] = static_cast<double>(at_once);
        state.counters["held_after_wait_bytes"] = static_cast<double>(after);
        state.counters["back_at_once_pct"] = pct(at_once);
        state.counters["back_pct"] = pct(after);
        state.counters["idle_bytes"] = static_cast<double>(after);
        state.counters["wait_ms"] = static_cast<double>(wait.count());
        state.counters["free_call_us"] = std::chrono::duration<double, std::micro>(free_call).count();
    });
}

/// Churn: 40 sequences of lognormal lengths, one freed and one admitted per step; held bytes over
/// live block bytes after each step. Runs on `Config`'s own backing.
template <class Config, class Layout>
void run_churn(benchmark::State& state, std::size_t steps) {
    constexpr std::size_t live_seqs = 40;
    const std::size_t max_blocks = block_cap<Config>(8192);  // 16 GiB of address space (managed: capped)
    auto c = make_cache<Config, Layout>(max_blocks);
    std::mt19937_64 rng(665);
    std::lognormal_distribution<double> length(std::log(665.0), 0.88);
    std::uniform_int_distribution<std::size_t> pick(0, live_seqs - 1);
    const auto admit = [&] {
        auto tokens = static_cast<std::size_t>(std::max(1.0, std::round(length(rng))));
        // never more than the cache holds (only a capped managed cache comes near)
        const std::size_t room = (c->free_blocks() > 0 ? c->free_blocks() - 1 : 0) * block_tokens;
        tokens = std::min(tokens, std::max<std::size_t>(room, 1));
        const auto s = c->add_sequence();
        c->append(s, tokens);
        return s;
    };
    std::vector<vmmpp::seq_id> seqs;
    for (std::size_t i = 0; i < live_seqs; ++i) {
        seqs.push_back(admit());
    }
    double sum = 0;
    double worst = 0;
    double live_sum = 0;
    for (std::size_t step = 0; step < steps; ++step) {
        auto& victim = seqs[pick(rng)];
        c->free(victim);
        victim = admit();
        const double live = static_cast<double>(c->used_blocks() * block_bytes);
        const double ratio = static_cast<double>(held_bytes(*c)) / live;
        sum += ratio;
        live_sum += live;
        worst = std::max(worst, ratio);
    }
    state.counters["churn_mean"] = sum / static_cast<double>(steps);
    state.counters["churn_worst"] = worst;
    state.counters["live_mean_bytes"] = live_sum / static_cast<double>(steps);
    state.counters["steps"] = static_cast<double>(steps);
}

/// A preallocated cache holds its whole capacity whatever is live: its churn ratio would only
/// say how large the benchmark made it.
template <class Config>
bool not_elastic(benchmark::State& state) {
    if constexpr (!Config::growth_type::is_elastic) {
        state.SkipWithError("not elastic: holds its whole capacity");
        return true;
    } else {
        return false;
    }
}

template <class Config, class Layout>
void scenario_churn(benchmark::State& state) {
    if (not_elastic<Config>(state) || no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] { run_churn<Config, Layout>(state, the_sizes().churn_steps); });
}

template <class Config, class Layout>
void scenario_churn_host(benchmark::State& state) {
    if (not_elastic<Config>(state)) {
        return;
    }
    guarded(state, [&] { run_churn<host_twin<Config>, Layout>(state, the_sizes().host_churn_steps); });
}

/// The contiguous byte ranges blocks [0, n) of `Layout` cover in a cache's span, merged.
template <class Layout>
std::vector<std::pair<std::size_t, std::size_t>> block_ranges(std::size_t n, std::size_t max_blocks) {
    const vmmpp::kv_geometry g = geometry(max_blocks);
    std::vector<std::pair<std::size_t, std::size_t>> pieces;
    for (std::size_t b = 0; b < n; ++b) {
        Layout::for_each_piece(g, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) { pieces.emplace_back(off, bytes); });
    }
    std::sort(pieces.begin(), pieces.end());
    std::vector<std::pair<std::size_t, std::size_t>> merged;
    for (const auto& [off, bytes] : pieces) {
        if (!merged.empty() && merged.back().first + merged.back().second == off) {
            merged.back().second += bytes;
        } else {
            merged.emplace_back(off, bytes);
        }
    }
    return merged;
}

/// A CUDA stream with two events: GPU time of what is queued between them.
class gpu_timer {
public:
    gpu_timer() {
        using vmmpp::driver::check;
        check(::cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        check(::cudaEventCreate(&start_), "cudaEventCreate");
        check(::cudaEventCreate(&stop_), "cudaEventCreate");
    }
    gpu_timer(const gpu_timer&) = delete;
    gpu_timer& operator=(const gpu_timer&) = delete;
    ~gpu_timer() {
        (void)::cudaStreamSynchronize(stream_);
        (void)::cudaEventDestroy(start_);
        (void)::cudaEventDestroy(stop_);
        (void)::cudaStreamDestroy(stream_);
    }
    [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
    /// Seconds of GPU time `enqueue` queues on the stream.
    template <class F>
    double time(F&& enqueue) {
        using vmmpp::driver::check;
        check(::cudaEventRecord(start_, stream_), "cudaEventRecord");
        std::forward<F>(enqueue)(stream_);
        check(::cudaEventRecord(stop_, stream_), "cudaEventRecord");
        check(::cudaEventSynchronize(stop_), "cudaEventSynchronize");
        float ms = 0;
        check(::cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
        return static_cast<double>(ms) * 1e-3;
    }

private:
    cudaStream_t stream_{};
    cudaEvent_t start_{};
    cudaEvent_t stop_{};
};

/// Copies the first half of each range to its second half; bytes read + written per second,
/// best of 5 after a warm-up.
inline double copy_GBps(gpu_timer& t, std::byte* base, const std::vector<std::pair<std::size_t, std::size_t>>& ranges) {
    std::size_t moved = 0;
    const auto enqueue = [&](cudaStream_t s) {
        for (const auto& [off, bytes] : ranges) {
            const std::size_t half = bytes / 2 / 16 * 16;
            vmmpp::driver::check(::cudaMemcpyAsync(base + off + bytes / 2, base + off, half, cudaMemcpyDeviceToDevice, s),
                                 "cudaMemcpyAsync");
        }
    };
    for (const auto& [off, bytes] : ranges) {
        moved += 2 * (bytes / 2 / 16 * 16);
    }
    (void)t.time(enqueue);
    double best = 0;
    for (int i = 0; i < 5; ++i) {
        best = std::max(best, static_cast<double>(moved) / t.time(enqueue) / 1e9);
    }
    return best;
}

/// Copy bandwidth over the committed ranges of a grown cache against the same copies (same
/// sizes, one cudaMalloc laid end to end) over cudaMalloc memory.
template <class Config, class Layout>
void scenario_bandwidth(benchmark::State& state) {
    if (no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] {
        const std::size_t n = block_cap<Config>(std::min(the_sizes().grow_bytes, 4 * GiB) / block_bytes);
        auto c = make_cache<Config, Layout>(n);
        const auto seq = c->add_sequence();
        c->append(seq, n * block_tokens);
        const auto ranges = block_ranges<Layout>(n, n);
        std::size_t total = 0;
        std::vector<std::pair<std::size_t, std::size_t>> packed;
        for (const auto& [off, bytes] : ranges) {
            packed.emplace_back(total, bytes);
            total += bytes;
        }
        gpu_timer t;
        const double pool = copy_GBps(t, c->pool().base(), ranges);
        void* p = nullptr;
        vmmpp::driver::check(::cudaMalloc(&p, total), "cudaMalloc");
        const std::unique_ptr<void, decltype(&::cudaFree)> owner(p, &::cudaFree);
        const double plain = copy_GBps(t, static_cast<std::byte*>(p), packed);
        state.counters["pool_GBps"] = pool;
        state.counters["cudaMalloc_GBps"] = plain;
        state.counters["bw_ratio"] = pool / plain;
        state.counters["ranges"] = static_cast<double>(ranges.size());
        state.counters["bytes"] = static_cast<double>(total);
    });
}

/// An engine's 64 small steps (8 MiB D2D copies) on its own stream, timed on the GPU.
class engine_steps {
public:
    static constexpr std::size_t steps = 64;
    static constexpr std::size_t step_bytes = 8 * MiB;
    engine_steps() {
        vmmpp::driver::check(::cudaMalloc(&scratch_, 2 * step_bytes), "cudaMalloc(scratch)");
    }
    engine_steps(const engine_steps&) = delete;
    engine_steps& operator=(const engine_steps&) = delete;
    ~engine_steps() { (void)::cudaFree(scratch_); }
    /// GPU microseconds of one run of the 64 steps.
    double run_us() {
        auto* src = static_cast<std::byte*>(scratch_);
        return 1e6 * timer_.time([&](cudaStream_t s) {
            for (std::size_t i = 0; i < steps; ++i) {
                vmmpp::driver::check(::cudaMemcpyAsync(src + step_bytes, src, step_bytes, cudaMemcpyDeviceToDevice, s),
                                     "cudaMemcpyAsync");
            }
        });
    }

private:
    void* scratch_ = nullptr;
    gpu_timer timer_;
};

inline double median(std::vector<double> v) {
    if (v.empty()) {
        return 0;
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/// GPU time of the engine's steps, idle and while another thread grows a cache at 20 GB/s.
template <class Config, class Layout>
void scenario_engine(benchmark::State& state) {
    if (no_gpu(state, needs_gpu<Config>)) {
        return;
    }
    guarded(state, [&] {
        engine_steps engine;
        (void)engine.run_us();  // warm-up
        std::vector<double> idle;
        for (int i = 0; i < 30; ++i) {
            idle.push_back(engine.run_us());
        }
        const std::size_t n = block_cap<Config>(the_sizes().grow_bytes / block_bytes);
        auto c = make_cache<Config, Layout>(n);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        std::atomic<bool> done{false};
        std::exception_ptr grower_error;
        std::thread grower([&] {
            try {
                init_cuda_runtime();
                const auto seq = c->add_sequence();
                auto next = clock_type::now();
                for (std::size_t i = 0; i < n; ++i) {
                    spin_until(next);
                    next += pacing_interval(paced_GBps);
                    c->append(seq, block_tokens);
                }
            } catch (...) {
                grower_error = std::current_exception();
            }
            done = true;
        });
        std::vector<double> busy;
        while (!done || busy.size() < 5) {
            busy.push_back(engine.run_us());
            if (done && busy.size() >= 5) {
                break;
            }
        }
        grower.join();
        if (grower_error) {
            std::rethrow_exception(grower_error);
        }
        const double idle_us = median(idle);
        const double busy_us = median(busy);
        state.counters["engine_idle_us"] = idle_us;
        state.counters["engine_busy_us"] = busy_us;
        state.counters["engine_busy_max_us"] = *std::max_element(busy.begin(), busy.end());
        state.counters["engine_slowdown_pct"] = 100.0 * (busy_us / idle_us - 1.0);
        state.counters["engine_runs_busy"] = static_cast<double>(busy.size());
    });
}

// ---------------------------------------------------------------------------------------------
// Floors: the raw driver and a cudaMallocAsync pool

/// Raw VMM handles of `HandleBytes`, each mapped and opened at a fixed slot of one reservation,
/// in the context the calling thread has current (as an engine's thread does).
template <std::size_t HandleBytes>
class raw_driver {
public:
    explicit raw_driver(std::size_t bytes)
        : context_(0), reservation_(bytes, HandleBytes), prop_(vmmpp::device_allocation_prop(0)), handles_(bytes / HandleBytes) {
        access_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        access_.location.id = 0;
        access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    }
    raw_driver(const raw_driver&) = delete;
    raw_driver& operator=(const raw_driver&) = delete;
    ~raw_driver() {
        for (std::size_t i = 0; i < handles_.size(); ++i) {
            if (handles_[i] != 0) {
                release(i);
            }
        }
    }
    [[nodiscard]] std::size_t slots() const noexcept { return handles_.size(); }
    void grow(std::size_t slot) {
        using vmmpp::driver::check;
        const auto& d = vmmpp::driver::get();
        CUmemGenericAllocationHandle h{};
        const CUdeviceptr at = reservation_.base() + slot * HandleBytes;
        check(d.mem_create(&h, HandleBytes, &prop_, 0), "cuMemCreate");
        if (const CUresult r = d.mem_map(at, HandleBytes, 0, h, 0); r != CUDA_SUCCESS) {
            (void)d.mem_release(h);
            check(r, "cuMemMap");
        }
        handles_[slot] = h;
        check(d.mem_set_access(at, HandleBytes, &access_, 1), "cuMemSetAccess");
    }
    void release(std::size_t slot) {
        const auto& d = vmmpp::driver::get();
        (void)d.mem_unmap(reservation_.base() + slot * HandleBytes, HandleBytes);
        (void)d.mem_release(handles_[slot]);
        handles_[slot] = 0;
    }

private:
    vmmpp::primary_context context_;
    vmmpp::address_reservation reservation_;
    CUmemAllocationProp prop_;
    CUmemAccessDesc access_{};
    std::vector<CUmemGenericAllocationHandle> handles_;
};

/// The raw floors in the scenarios where they apply: grow, paced, steady (release one handle,
/// then create + map + open one), burst.
template <std::size_t HandleBytes>
void floor_raw(benchmark::State& state, int scenario) {
    if (no_gpu(state, true)) {
        return;
    }
    guarded(state, [&] {
        const auto& sz = the_sizes();
        latencies calls;
        if (scenario == 0 || scenario == 1) {  // grow, paced
            raw_driver<HandleBytes> raw(sz.grow_bytes);
            if (scenario == 1) {  // filled and emptied once, as the caches are
                for (std::size_t i = 0; i < raw.slots(); ++i) {
                    raw.grow(i);
                }
                for (std::size_t i = 0; i < raw.slots(); ++i) {
                    raw.release(i);
                }
            }
            const auto interval = pacing_interval(paced_GBps) * static_cast<std::int64_t>(HandleBytes / block_bytes);
            const auto start = clock_type::now();
            auto next = start;
            for (std::size_t i = 0; i < raw.slots(); ++i) {
                if (scenario == 1) {
                    spin_until(next);
                    next += interval;
                }
                timed(calls, [&] { raw.grow(i); });
            }
            const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
            state.counters["achieved_GBps"] = static_cast<double>(sz.grow_bytes) / seconds / 1e9;
        } else if (scenario == 2) {  // steady
            raw_driver<HandleBytes> raw(sz.steady_bytes);
            for (std::size_t i = 0; i < raw.slots(); ++i) {
                raw.grow(i);
            }
            std::mt19937_64 rng(16);
            std::uniform_int_distribution<std::size_t> pick(0, raw.slots() - 1);
            for (std::size_t i = 0; i < sz.steady_calls; ++i) {
                const std::size_t slot = pick(rng);
                raw.release(slot);
                timed(calls, [&] { raw.grow(slot); });
            }
        } else {  // burst
            raw_driver<HandleBytes> raw(sz.burst_bytes);
            const auto start = clock_type::now();
            for (std::size_t i = 0; i < raw.slots(); ++i) {
                timed(calls, [&] { raw.grow(i); });
            }
            const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
            state.counters["burst_GBps"] = static_cast<double>(sz.burst_bytes) / seconds / 1e9;
            state.counters["burst_bytes"] = static_cast<double>(sz.burst_bytes);
        }
        calls.report(state);
        state.counters["handle_bytes"] = static_cast<double>(HandleBytes);
    });
}

/// A cudaMallocAsync pool on device 0 that never trims itself (release threshold at its maximum),
/// and a stream to allocate on.
class async_pool {
public:
    async_pool() {
        using vmmpp::driver::check;
        cudaMemPoolProps props{};
        props.allocType = cudaMemAllocationTypePinned;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = 0;
        check(::cudaMemPoolCreate(&pool_, &props), "cudaMemPoolCreate");
        std::uint64_t threshold = UINT64_MAX;
        check(::cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &threshold), "cudaMemPoolSetAttribute");
        check(::cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    }
    async_pool(const async_pool&) = delete;
    async_pool& operator=(const async_pool&) = delete;
    ~async_pool() {
        for (void* p : live_) {
            if (p != nullptr) {
                (void)::cudaFreeAsync(p, stream_);
            }
        }
        (void)::cudaStreamSynchronize(stream_);
        (void)::cudaStreamDestroy(stream_);
        (void)::cudaMemPoolDestroy(pool_);
    }
    void* alloc(std::size_t bytes) {
        void* p = nullptr;
        vmmpp::driver::check(::cudaMallocFromPoolAsync(&p, bytes, pool_, stream_), "cudaMallocFromPoolAsync");
        return p;
    }
    void free(void* p) { vmmpp::driver::check(::cudaFreeAsync(p, stream_), "cudaFreeAsync"); }
    [[nodiscard]] std::size_t reserved() const {
        std::uint64_t v = 0;
        vmmpp::driver::check(::cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrReservedMemCurrent, &v), "cudaMemPoolGetAttribute");
        return static_cast<std::size_t>(v);
    }
    std::vector<void*> live_;  ///< what the scenario holds (freed on destruction)

private:
    cudaMemPool_t pool_{};
    cudaStream_t stream_{};
};

/// The cudaMallocAsync floor: grow, paced, steady, burst (2 MiB per call), memory.
inline void floor_async(benchmark::State& state, int scenario) {
    if (no_gpu(state, true)) {
        return;
    }
    guarded(state, [&] {
        const auto& sz = the_sizes();
        async_pool pool;
        latencies calls;
        if (scenario == 0 || scenario == 1 || scenario == 4) {  // grow, paced, memory
            const std::size_t n = sz.grow_bytes / block_bytes;
            pool.live_.reserve(n);
            if (scenario == 1) {
                for (std::size_t i = 0; i < n; ++i) {
                    pool.live_.push_back(pool.alloc(block_bytes));
                }
                for (void*& p : pool.live_) {
                    pool.free(p);
                    p = nullptr;
                }
                pool.live_.clear();
                std::this_thread::sleep_for(quiet_margin);
            }
            const auto interval = pacing_interval(paced_GBps);
            const auto start = clock_type::now();
            auto next = start;
            for (std::size_t i = 0; i < n; ++i) {
                if (scenario == 1) {
                    spin_until(next);
                    next += interval;
                }
                pool.live_.push_back(timed(calls, [&] { return pool.alloc(block_bytes); }));
            }
            const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
            state.counters["achieved_GBps"] = static_cast<double>(n * block_bytes) / seconds / 1e9;
            if (scenario == 4) {
                const std::size_t held = pool.reserved();
                for (void*& p : pool.live_) {
                    pool.free(p);
                    p = nullptr;
                }
                const std::size_t at_once = pool.reserved();
                std::this_thread::sleep_for(quiet_margin);
                const std::size_t after = pool.reserved();
                const auto pct = [&](std::size_t now) {
                    return held == 0 ? 0.0 : 100.0 * static_cast<double>(held - std::min(held, now)) / static_cast<double>(held);
                };
                state.counters["held_before_bytes"] = static_cast<double>(held);
                state.counters["held_at_once_bytes"] = static_cast<double>(at_once);
                state.counters["held_after_wait_bytes"] = static_cast<double>(after);
                state.counters["back_at_once_pct"] = pct(at_once);
                state.counters["back_pct"] = pct(after);
                state.counters["idle_bytes"] = static_cast<double>(after);
                return;
            }
        } else if (scenario == 2) {  // steady
            const std::size_t live = sz.steady_bytes / block_bytes;
            for (std::size_t i = 0; i < live; ++i) {
                pool.live_.push_back(pool.alloc(block_bytes));
            }
            std::mt19937_64 rng(16);
            std::uniform_int_distribution<std::size_t> pick(0, live - 1);
            for (std::size_t i = 0; i < sz.steady_calls; ++i) {
                void*& slot = pool.live_[pick(rng)];
                pool.free(slot);
                slot = timed(calls, [&] { return pool.alloc(block_bytes); });
            }
        } else {  // burst: whole 256 MiB sequences' worth, 2 MiB a call
            const std::size_t n = sz.burst_bytes / block_bytes;
            pool.live_.reserve(n);
            const auto start = clock_type::now();
            for (std::size_t i = 0; i < n; ++i) {
                pool.live_.push_back(timed(calls, [&] { return pool.alloc(block_bytes); }));
            }
            const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
            state.counters["burst_GBps"] = static_cast<double>(sz.burst_bytes) / seconds / 1e9;
            state.counters["burst_bytes"] = static_cast<double>(sz.burst_bytes);
        }
        calls.report(state);
    });
}

// ---------------------------------------------------------------------------------------------
// Registration

inline void add(const std::string& name, std::function<void(benchmark::State&)> f) {
    benchmark::RegisterBenchmark(name.c_str(), [f = std::move(f)](benchmark::State& state) { f(state); })->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
}

template <class Peer, class LayoutEntry>
void register_subject() {
    using C = typename Peer::config;
    using L = typename LayoutEntry::layout;
    const std::string tag = Peer::name() + "/" + LayoutEntry::name();
    if (is_default_layout<C, L>) {
        benchmark::AddCustomContext("peers_default_layout/" + Peer::name(), LayoutEntry::name());
    }
    add("grow/" + tag, scenario_grow<C, L, false>);
    add("paced/" + tag, scenario_grow<C, L, true>);
    add("steady/" + tag, scenario_steady<C, L>);
    add("burst/" + tag, scenario_burst<C, L>);
    add("memory/" + tag, scenario_memory<C, L>);
    add("churn/" + tag, scenario_churn<C, L>);
    add("churn_host/" + tag, scenario_churn_host<C, L>);
    add("bandwidth/" + tag, scenario_bandwidth<C, L>);
    add("engine/" + tag, scenario_engine<C, L>);
}

template <class Peer, class... Layouts>
void register_peer(std::tuple<Layouts...>*) {
    (register_subject<Peer, Layouts>(), ...);
}

template <class... Peers>
void register_all(std::tuple<Peers...>*) {
    const char* scenarios[] = {"grow", "paced", "steady", "burst"};
    for (int s = 0; s < 4; ++s) {
        add(std::string(scenarios[s]) + "/raw_driver_2MiB", [s](benchmark::State& st) { floor_raw<2 * MiB>(st, s); });
        add(std::string(scenarios[s]) + "/raw_driver_32MiB", [s](benchmark::State& st) { floor_raw<32 * MiB>(st, s); });
    }
    const char* async_scenarios[] = {"grow", "paced", "steady", "burst", "memory"};
    for (int s = 0; s < 5; ++s) {
        add(std::string(async_scenarios[s]) + "/cudaMallocAsync_pool", [s](benchmark::State& st) { floor_async(st, s); });
    }
    (register_peer<Peers>(static_cast<peer_layouts*>(nullptr)), ...);
}

} // namespace vmmpp_peers

int main(int argc, char** argv) {
    try {
        const auto& sz = vmmpp_peers::the_sizes();
        benchmark::AddCustomContext("peers_scale", std::to_string(sz.scale));
        benchmark::AddCustomContext("peers_grow_bytes", std::to_string(sz.grow_bytes));
        benchmark::AddCustomContext("peers_burst_bytes", std::to_string(sz.burst_bytes));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "peers_vmmpp: %s\n", e.what());
        return 2;
    }
    vmmpp_peers::register_all(static_cast<vmmpp_peers::peer_configs*>(nullptr));
    const int rc = vmmpp_bench::run_benchmarks(argc, argv);
    if (rc != 0) {
        return rc;
    }
    if (vmmpp_peers::failures > 0) {
        std::fprintf(stderr, "peers_vmmpp: %d benchmark(s) failed\n", vmmpp_peers::failures.load());
        return 1;
    }
    return 0;
}
