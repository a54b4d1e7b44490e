// bench/bench_mapper.cpp: growth off the critical path (issue 9). In one run:
//
//   floor/<backing>_stream   the raw floor: create + map + open one 2 MiB page at a fresh offset,
//                            page after page, for the whole stream (what a cache that grows
//                            pays); per-page p50/p99/max and GB/s.
//   fill/<config>            the background mapper alone: time for it to map the whole stream as
//                            spares; GB/s and its ratio to the floor measured just before it in
//                            the same benchmark (target >= 0.90).
//   append/<config>/<us>     the critical path: a steady decode stream of 16 sequences, one
//                            token each per step, staggered so exactly one append per step needs
//                            a new 2 MiB block; a step every <us> microseconds (0: as fast as
//                            possible); the cache grows by the whole stream. Counters: p50/p99/max
//                            of the appends that needed a new block (target p99 <= 2 us), the
//                            growth rate asked for and achieved (GB/s), and how many pages the
//                            caller had to map itself (sync_commits) or wait for (waits), and
//                            the same tails for the appends that stayed within a block.
//   append/elastic_config_prewarmed/<us>  the control: every page committed before the stream,
//                            no mapper thread: the bookkeeping's own tail under the same pacing.
//
// The stream is VMMPP_BENCH_STREAM_MIB MiB (default 8192: 8 GiB, the minimum); CI runs the
// host configurations with a small one.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.hpp"
#include "vmmpp/vmmpp.hpp"

namespace vmmpp_bench {
namespace {

using clock = std::chrono::steady_clock;
constexpr std::size_t page_bytes = 2 * MiB;

std::size_t stream_bytes() {
    const char* env = std::getenv("VMMPP_BENCH_STREAM_MIB");
    const std::size_t mib = env != nullptr ? std::strtoull(env, nullptr, 10) : 8192;
    return std::max<std::size_t>(mib, 64) * MiB / page_bytes * page_bytes;
}

/// Llama-3-8B-like: 32 layers, 8 KV heads of 128, f16, 16-token blocks: one block is 2 MiB, so in
/// block-major layout every new block is one new page.
vmmpp::kv_geometry stream_geometry(std::size_t blocks) {
    return vmmpp::kv_geometry{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::f16,
                              .block_tokens = 16, .max_blocks = static_cast<std::uint32_t>(blocks)};
}

// Configurations: the same backing with and without the background mapper.
using host_mapped_config = vmmpp::pool_config<vmmpp::host, vmmpp::mapped_ahead<vmmpp::page_granular>, vmmpp::unlimited>;
template <class Config>
struct stream_config_name;
template <>
struct stream_config_name<vmmpp::elastic_config> {
    static constexpr const char* value = "elastic_config";
};
template <>
struct stream_config_name<vmmpp::elastic_mapped_ahead_config> {
    static constexpr const char* value = "elastic_mapped_ahead_config";
};
template <>
struct stream_config_name<vmmpp::host_config> {
    static constexpr const char* value = "host_config";
};
template <>
struct stream_config_name<host_mapped_config> {
    static constexpr const char* value = "host_mapped_ahead";
};

/// The growth policy a benchmark builds: up to 64 spare pages (128 MiB; refill below 32), so a
/// driver stall of ~1 ms (the floor's max) at the fastest rates the mapper follows costs no wait.
template <class Growth>
Growth bench_growth() {
    Growth g{};
    if constexpr (vmmpp::background_growth_policy<Growth>) {
        g.low_watermark = 32;
        g.high_watermark = 64;
        g.release_delay = std::chrono::milliseconds(200);
    }
    return g;
}

template <class Quota>
Quota bench_quota(std::size_t limit) {
    if constexpr (std::is_same_v<Quota, vmmpp::shared_budget>) {
        vmmpp::budget budget(limit);
        return budget.register_model("bench", limit);
    } else {
        return Quota{};
    }
}

/// The raw floor for a grow-only stream: one handle per page, each at a fresh offset of one
/// reservation, in the context the thread already has current (as an engine's thread does).
class raw_vmm_stream {
public:
    static constexpr const char* name = "floor/vmm_2MiB_stream";
    explicit raw_vmm_stream(std::size_t bytes)
        : context_(0), reservation_(bytes, page_bytes), prop_(vmmpp::device_allocation_prop(0)) {
        access_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        access_.location.id = 0;
        access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        handles_.reserve(bytes / page_bytes);
    }
    raw_vmm_stream(const raw_vmm_stream&) = delete;
    raw_vmm_stream& operator=(const raw_vmm_stream&) = delete;
    ~raw_vmm_stream() {
        const auto& d = vmmpp::driver::get();
        for (std::size_t i = 0; i < handles_.size(); ++i) {
            (void)d.mem_unmap(reservation_.base() + i * page_bytes, page_bytes);
            (void)d.mem_release(handles_[i]);
        }
    }
    void grow_page() {
        using vmmpp::driver::check;
        const auto& d = vmmpp::driver::get();
        CUmemGenericAllocationHandle h{};
        const CUdeviceptr at = reservation_.base() + handles_.size() * page_bytes;
        check(d.mem_create(&h, page_bytes, &prop_, 0), "cuMemCreate");
        handles_.push_back(h);
        check(d.mem_map(at, page_bytes, 0, h, 0), "cuMemMap");
        check(d.mem_set_access(at, page_bytes, &access_, 1), "cuMemSetAccess");
    }

private:
    vmmpp::primary_context context_;
    vmmpp::address_reservation reservation_;
    CUmemAllocationProp prop_;
    CUmemAccessDesc access_{};
    std::vector<CUmemGenericAllocationHandle> handles_;
};

/// The host floor: mprotect of fresh 2 MiB pages of one PROT_NONE reservation.
class raw_host_stream {
public:
    static constexpr const char* name = "floor/host_2MiB_stream";
    explicit raw_host_stream(std::size_t bytes)
        : bytes_(bytes), p_(::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)) {
        if (p_ == MAP_FAILED) {
            throw std::runtime_error("mmap failed");
        }
    }
    raw_host_stream(const raw_host_stream&) = delete;
    raw_host_stream& operator=(const raw_host_stream&) = delete;
    ~raw_host_stream() { ::munmap(p_, bytes_); }
    void grow_page() {
        if (::mprotect(static_cast<std::byte*>(p_) + next_ * page_bytes, page_bytes, PROT_READ | PROT_WRITE) != 0) {
            throw std::runtime_error(std::string("mprotect: ") + std::strerror(errno));
        }
        ++next_;
    }

private:
    std::size_t bytes_;
    void* p_;
    std::size_t next_ = 0;
};

template <class Config>
using floor_for = std::conditional_t<needs_gpu<Config>, raw_vmm_stream, raw_host_stream>;

/// Grows the raw floor by `bytes`, page by page; returns the per-page samples' total time.
template <class Floor>
double run_floor(std::size_t bytes, std::vector<double>* per_page_us) {
    Floor floor(bytes);
    const auto start = clock::now();
    for (std::size_t i = 0; i < bytes / page_bytes; ++i) {
        const auto t0 = clock::now();
        floor.grow_page();
        if (per_page_us != nullptr) {
            per_page_us->push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count());
        }
    }
    return std::chrono::duration<double>(clock::now() - start).count();
}

/// p50 / p99 / max of `v` (sorted here) as counters `<prefix>_p50_us` etc.
void report_tail(benchmark::State& state, const std::string& prefix, std::vector<double>& v) {
    if (v.empty()) {
        return;
    }
    std::sort(v.begin(), v.end());
    const auto at = [&](double q) { return v[std::min(v.size() - 1, static_cast<std::size_t>(q * v.size()))]; };
    state.counters[prefix + "_p50_us"] = at(0.50);
    state.counters[prefix + "_p99_us"] = at(0.99);
    state.counters[prefix + "_max_us"] = v.back();
}

bool skip_without_gpu(benchmark::State& state, bool gpu) {
    if (gpu && !has_gpu()) {
        state.SkipWithError("no CUDA device");
        return true;
    }
    if (gpu) {
        init_cuda_runtime();  // the runtime's context is the primary one: current on this thread
    }
    return false;
}

template <class Config>
void BM_floor(benchmark::State& state) {
    if (skip_without_gpu(state, needs_gpu<Config>)) {
        return;
    }
    const std::size_t bytes = stream_bytes();
    std::vector<double> per_page;
    per_page.reserve(bytes / page_bytes);
    double seconds = 0;
    try {
        for (auto _ : state) {
            seconds = run_floor<floor_for<Config>>(bytes, &per_page);
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    report_tail(state, "page", per_page);
    state.counters["GBps"] = static_cast<double>(bytes) / seconds / 1e9;
    state.counters["stream_GiB"] = static_cast<double>(bytes) / static_cast<double>(GiB);
}

/// The mapper fills the whole stream with spares; the floor runs first, in the same benchmark.
template <class Config>
void BM_fill(benchmark::State& state) {
    if (skip_without_gpu(state, needs_gpu<Config>)) {
        return;
    }
    const std::size_t bytes = stream_bytes();
    const std::size_t units = bytes / page_bytes;
    try {
        for (auto _ : state) {
            const double floor_seconds = run_floor<floor_for<Config>>(bytes, nullptr);
            auto growth = bench_growth<typename Config::growth_type>();
            growth.low_watermark = units;
            growth.high_watermark = units;
            growth.release_delay = std::chrono::hours(1);
            vmmpp::elastic_pool<Config> pool(bytes, {}, growth, bench_quota<typename Config::quota_type>(bytes));
            const auto start = clock::now();
            pool.will_need(0, 1);
            while (pool.stats().idle_units < units) {
                std::this_thread::sleep_for(std::chrono::microseconds(50));
            }
            const double seconds = std::chrono::duration<double>(clock::now() - start).count();
            const auto s = pool.stats();
            state.counters["GBps"] = static_cast<double>(bytes) / seconds / 1e9;
            state.counters["floor_GBps"] = static_cast<double>(bytes) / floor_seconds / 1e9;
            state.counters["ratio_to_floor"] = floor_seconds / seconds;
            state.counters["mapper_commits"] = static_cast<double>(s.mapper_commits);
            state.counters["driver_time_share"] = std::chrono::duration<double>(s.driver_time).count() / seconds;
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

/// The critical path of a steady decode stream; see the file comment. `Prewarmed` is the
/// control: a pool without a mapper whose pages were all committed (grown and freed, kept as
/// spares) before the stream, so no append pays the driver and none meets a mapper: what the
/// bookkeeping alone costs under the same pacing.
template <class Config, bool Prewarmed = false>
void BM_append(benchmark::State& state) {
    if (skip_without_gpu(state, needs_gpu<Config>)) {
        return;
    }
    const auto interval = std::chrono::microseconds(state.range(0));
    constexpr std::size_t sequences = 16;
    const std::size_t new_blocks = stream_bytes() / page_bytes;
    const vmmpp::kv_geometry g = stream_geometry(new_blocks + sequences + 16);
    using cache_type = vmmpp::kv_cache<Config, vmmpp::block_major>;
    try {
        for (auto _ : state) {
            state.PauseTiming();
            const std::size_t span = g.total_bytes() + page_bytes;
            auto growth = bench_growth<typename Config::growth_type>();
            if constexpr (Prewarmed) {
                growth.spare_pages = span / page_bytes;
            }
            cache_type cache(g, {}, growth, bench_quota<typename Config::quota_type>(span));
            if constexpr (Prewarmed) {
                const vmmpp::seq_id all = cache.add_sequence();
                cache.append(all, std::size_t{g.max_blocks} * g.block_tokens);
                cache.free(all);
            }
            std::vector<vmmpp::seq_id> seqs;
            for (std::size_t i = 0; i < sequences; ++i) {
                seqs.push_back(cache.add_sequence());
                cache.append(seqs.back(), g.block_tokens - i);  // staggered: one new block per step
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let a mapper fill its spares
            const auto before = cache.pool().stats();
            std::vector<double> critical;
            std::vector<double> in_block;  // appends within a block: the same calls, no new memory
            critical.reserve(new_blocks);
            in_block.reserve(new_blocks * (sequences - 1));
            state.ResumeTiming();
            const auto start = clock::now();
            auto next = start;
            for (std::size_t step = 0; step < new_blocks; ++step) {
                while (clock::now() < next) {
                    // the step's compute: spin, as a busy GPU-feeding thread would
                }
                for (vmmpp::seq_id s : seqs) {
                    const bool needs_block = cache.tokens(s) % g.block_tokens == 0;
                    const auto t0 = clock::now();
                    cache.append(s, 1);
                    const double us = std::chrono::duration<double, std::micro>(clock::now() - t0).count();
                    (needs_block ? critical : in_block).push_back(us);
                }
                next += interval;
            }
            const double seconds = std::chrono::duration<double>(clock::now() - start).count();
            state.PauseTiming();
            const auto after = cache.pool().stats();
            report_tail(state, "append_new_block", critical);
            report_tail(state, "append_in_block", in_block);
            const double grown = static_cast<double>(new_blocks * page_bytes);
            state.counters["asked_GBps"] =
                interval.count() > 0 ? static_cast<double>(page_bytes) / static_cast<double>(interval.count()) / 1e3 : 0.0;
            state.counters["achieved_GBps"] = grown / seconds / 1e9;
            state.counters["sync_commits"] = static_cast<double>(after.sync_commits - before.sync_commits);
            state.counters["mapper_commits"] = static_cast<double>(after.mapper_commits - before.mapper_commits);
            state.counters["waits"] = static_cast<double>(after.waits - before.waits);
            state.counters["grown_GiB"] = grown / static_cast<double>(GiB);
            for (vmmpp::seq_id s : seqs) {
                cache.free(s);
            }
            state.ResumeTiming();
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

// Rates: a step (one new 2 MiB page) every N us: 0 = as fast as possible, then 20 us (105 GB/s)
// down to 1000 us (2 GB/s).
void stream_intervals(benchmark::internal::Benchmark* b) {
    for (int us : {0, 20, 30, 40, 50, 60, 80, 100, 200, 1000}) {
        b->Arg(us);
    }
}

#define VMMPP_BENCH_STREAM(Config)                                                                              \
    BENCHMARK_TEMPLATE(BM_append, Config)                                                                       \
        ->Name(std::string("append/") + stream_config_name<Config>::value)                                     \
        ->Apply(stream_intervals)                                                                               \
        ->Iterations(1)                                                                                         \
        ->Unit(benchmark::kMillisecond)

BENCHMARK_TEMPLATE(BM_floor, vmmpp::elastic_config)->Name("floor/vmm_2MiB_stream")->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_fill, vmmpp::elastic_mapped_ahead_config)
    ->Name("fill/elastic_mapped_ahead_config")
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
VMMPP_BENCH_STREAM(vmmpp::elastic_config);
VMMPP_BENCH_STREAM(vmmpp::elastic_mapped_ahead_config);
BENCHMARK_TEMPLATE(BM_append, vmmpp::elastic_config, true)
    ->Name("append/elastic_config_prewarmed")
    ->Apply(stream_intervals)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_floor, vmmpp::host_config)->Name("floor/host_2MiB_stream")->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_fill, host_mapped_config)->Name("fill/host_mapped_ahead")->Iterations(1)->Unit(benchmark::kMillisecond);
VMMPP_BENCH_STREAM(vmmpp::host_config);
VMMPP_BENCH_STREAM(host_mapped_config);

} // namespace
} // namespace vmmpp_bench

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
