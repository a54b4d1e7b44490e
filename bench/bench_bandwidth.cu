// bench/bench_bandwidth.cu: the copy bandwidth a kernel gets from KV memory of each GPU
// configuration's pool, against the same kernel over plain cudaMalloc memory in the same run.
//
// Why: an elastic cache is only worth having if attention kernels run as fast on it as on one
// big cudaMalloc. VMM pages are mapped 2 MiB (or 32 MiB) at a time, managed memory is prefetched
// chunk by chunk; the goal is a ratio of at least 0.99 against cudaMalloc (2782 vs 2790 GB/s on
// an H100: docs/ARCHITECTURE.md, "Driver costs"; bench/results/nvidia-h100-80gb-hbm3-2026-11-23).
//
// Each subject owns 1 GiB (a pool of 1 GiB, every page held and committed, or one cudaMalloc)
// whose first half is copied to its second half by one launch of a grid-stride kernel with
// 16-byte loads and stores, timed with CUDA events (manual time). Counters: GBps = bytes read +
// written per second over the whole run, GBps_p50 / _p90 / ... the same per launch. The label
// names the baseline the summary divides by. Managed memory stays at 1 GiB: on an x86 + H100
// machine more managed memory than is free can hang the GPU (docs/ARCHITECTURE.md, "Managed
// memory (gh200_config)").
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>

#include "common.hpp"

namespace {

using namespace vmmpp_bench;

constexpr std::size_t buffer_bytes = GiB;

__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, std::size_t n) {
    const std::size_t stride = std::size_t{gridDim.x} * blockDim.x;
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
        dst[i] = src[i];
    }
}

/// 1 GiB of a pool of `Config`, all of it held (so committed, and for gh200_config prefetched).
template <class Config>
class pool_buffer {
public:
    static std::string name() { return std::string("pool/") + config_name<Config>::value; }

    pool_buffer() : pool_(make_pool<Config>(buffer_bytes)) { pool_->ensure_committed(0, buffer_bytes); }
    pool_buffer(const pool_buffer&) = delete;
    pool_buffer& operator=(const pool_buffer&) = delete;
    ~pool_buffer() { pool_->release(0, buffer_bytes); }

    [[nodiscard]] std::byte* data() const { return pool_->base(); }

private:
    std::unique_ptr<vmmpp::elastic_pool<Config>> pool_;
};

/// 1 GiB of one cudaMalloc: the baseline.
class cuda_malloc_buffer {
public:
    static std::string name() { return "baseline/cudaMalloc"; }

    cuda_malloc_buffer() {
        void* p = nullptr;
        vmmpp::driver::check(::cudaMalloc(&p, buffer_bytes), "cudaMalloc");
        data_ = static_cast<std::byte*>(p);
    }
    cuda_malloc_buffer(const cuda_malloc_buffer&) = delete;
    cuda_malloc_buffer& operator=(const cuda_malloc_buffer&) = delete;
    ~cuda_malloc_buffer() { (void)::cudaFree(data_); }

    [[nodiscard]] std::byte* data() const { return data_; }

private:
    std::byte* data_ = nullptr;
};

/// A CUDA event pair on the default stream, and the kernel's launch shape for device 0.
class launcher {
public:
    launcher() {
        init_cuda_runtime();
        using vmmpp::driver::check;
        check(::cudaEventCreate(&start_), "cudaEventCreate");
        check(::cudaEventCreate(&stop_), "cudaEventCreate");
        int sms = 0;
        int threads_per_sm = 0;
        check(::cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
        check(::cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, 0),
              "cudaDeviceGetAttribute");
        blocks_ = static_cast<unsigned>(sms * (threads_per_sm / threads));  // one full wave
    }
    launcher(const launcher&) = delete;
    launcher& operator=(const launcher&) = delete;
    ~launcher() {
        (void)::cudaEventDestroy(start_);
        (void)::cudaEventDestroy(stop_);
    }

    /// Copies the first half of [p, p+bytes) to the second half; returns the kernel's seconds.
    double copy(std::byte* p, std::size_t bytes) {
        using vmmpp::driver::check;
        const std::size_t half = bytes / 2;
        check(::cudaEventRecord(start_), "cudaEventRecord");
        copy_kernel<<<blocks_, threads>>>(reinterpret_cast<const uint4*>(p), reinterpret_cast<uint4*>(p + half),
                                          half / sizeof(uint4));
        check(::cudaGetLastError(), "copy_kernel launch");
        check(::cudaEventRecord(stop_), "cudaEventRecord");
        check(::cudaEventSynchronize(stop_), "cudaEventSynchronize");
        float ms = 0;
        check(::cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
        return ms * 1e-3;
    }

private:
    static constexpr unsigned threads = 256;
    cudaEvent_t start_{};
    cudaEvent_t stop_{};
    unsigned blocks_ = 0;
};

/// Marks the baseline itself (compared with nothing).
struct no_baseline {};

/// One copy launch per iteration over `Buffer`'s memory.
template <class Buffer, class Baseline>
void BM_copy(benchmark::State& state) {
    auto run = make_or_skip<launcher, true>(state);
    if (!run) {
        return;
    }
    auto buffer = make_or_skip<Buffer, true>(state);
    if (!buffer) {
        return;
    }
    samples gbps(state);
    double seconds = 0;
    try {
        (void)run->copy(buffer->data(), buffer_bytes);  // warm-up: module load, first touch
        for (auto _ : state) {
            const double s = run->copy(buffer->data(), buffer_bytes);
            seconds += s;
            gbps.add(buffer_bytes / s * 1e-9);
            state.SetIterationTime(s);
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    gbps.report(state, "GBps", 1.0);
    const double bytes_moved = static_cast<double>(buffer_bytes) * static_cast<double>(state.iterations());
    state.counters["GBps"] = bytes_moved / seconds * 1e-9;
    state.counters["bytes"] = static_cast<double>(buffer_bytes);
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(buffer_bytes));
    if constexpr (!std::is_same_v<Baseline, no_baseline>) {
        state.SetLabel("baseline=" + Baseline::name());
    }
}

using elastic = pool_buffer<vmmpp::elastic_config>;
using chunked16 = pool_buffer<vmm_chunked16_config>;
using static_pool = pool_buffer<vmmpp::static_config>;
using gh200 = pool_buffer<vmmpp::gh200_config>;

// Registered as "<buffer name>", the baseline first.
#define VMMPP_BENCH_COPY(Buffer, Baseline)          \
    BENCHMARK_TEMPLATE(BM_copy, Buffer, Baseline) \
        ->Name(Buffer::name())                    \
        ->UseManualTime()                         \
        ->Unit(benchmark::kMicrosecond)

VMMPP_BENCH_COPY(cuda_malloc_buffer, no_baseline);
VMMPP_BENCH_COPY(elastic, cuda_malloc_buffer);
VMMPP_BENCH_COPY(chunked16, cuda_malloc_buffer);
VMMPP_BENCH_COPY(static_pool, cuda_malloc_buffer);
VMMPP_BENCH_COPY(gh200, cuda_malloc_buffer);

} // namespace

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
