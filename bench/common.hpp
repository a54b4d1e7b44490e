// bench/common.hpp: what every vmmpp benchmark shares: the configurations under test and how to
// build a pool of each, skipping GPU work cleanly on a machine without a CUDA device, timing one
// operation, per-iteration latency percentiles as benchmark counters, and a main() that records
// the GPU in the JSON context. Compiles as C++20 under g++ and nvcc alike.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <exception>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vmmpp/backing/zeroing.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/device.hpp"

namespace vmmpp_bench {

inline constexpr std::size_t MiB = std::size_t{1} << 20;
inline constexpr std::size_t GiB = std::size_t{1} << 30;

// ---------------------------------------------------------------------------------------------
// Configurations

/// vmm backing with 32 MiB handles (16 pages per commit), no quota: chunked growth on the GPU.
using vmm_chunked16_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<16>, vmmpp::unlimited>;

/// The name a configuration goes by in benchmark names and the summary.
template <class Config>
struct config_name;
template <>
struct config_name<vmmpp::elastic_config> {
    static constexpr const char* value = "elastic_config";
};
template <>
struct config_name<vmm_chunked16_config> {
    static constexpr const char* value = "vmm_chunked16";
};
template <>
struct config_name<vmmpp::gh200_config> {
    static constexpr const char* value = "gh200_config";
};
template <>
struct config_name<vmmpp::static_config> {
    static constexpr const char* value = "static_config";
};
template <>
struct config_name<vmmpp::host_config> {
    static constexpr const char* value = "host_config";
};

/// Zero-on-reuse: the elastic and host configurations with every committed page zeroed first,
/// to measure what tenant isolation costs per page.
using vmm_zeroing_config = vmmpp::pool_config<vmmpp::zeroing<vmmpp::vmm>, vmmpp::page_granular, vmmpp::unlimited>;
using host_zeroing_config = vmmpp::pool_config<vmmpp::zeroing<vmmpp::host>, vmmpp::page_granular, vmmpp::unlimited>;
template <>
struct config_name<vmm_zeroing_config> {
    static constexpr const char* value = "vmm_zeroing";
};
template <>
struct config_name<host_zeroing_config> {
    static constexpr const char* value = "host_zeroing";
};

/// Whether a configuration's memory lives on a GPU (so its benchmarks need a CUDA device).
template <class Config>
inline constexpr bool needs_gpu = vmmpp::has_property<typename Config::backing_type, vmmpp::device_accessible>;

/// A pool of `capacity` bytes with default options. A shared_budget pool gets a budget of its
/// own whose global and model limits are the capacity (the budget's state lives as long as the
/// pool's share of it, so the local `budget` may go).
template <class Config>
std::unique_ptr<vmmpp::elastic_pool<Config>> make_pool(std::size_t capacity) {
    using pool = vmmpp::elastic_pool<Config>;
    if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
        vmmpp::budget budget(capacity);
        return std::make_unique<pool>(capacity, typename Config::backing_type::options{},
                                      typename Config::growth_type{}, budget.register_model("bench", capacity));
    } else {
        return std::make_unique<pool>(capacity);
    }
}

// ---------------------------------------------------------------------------------------------
// Running without a GPU

/// Whether this process sees a CUDA device (asked once).
inline bool has_gpu() {
    static const bool yes = vmmpp::driver::device_count() > 0;
    return yes;
}

/// Builds the thing a benchmark measures, or marks the benchmark skipped and returns null: when
/// it needs a GPU and there is none ("no CUDA device"), or when building it throws (the
/// exception's message). `T` need not be movable.
template <class T, bool NeedsGpu, class... Args>
std::unique_ptr<T> make_or_skip(benchmark::State& state, Args&&... args) {
    if (NeedsGpu && !has_gpu()) {
        state.SkipWithError("no CUDA device");
        return nullptr;
    }
    try {
        return std::make_unique<T>(std::forward<Args>(args)...);
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return nullptr;
    }
}

/// Makes device 0's primary context (the one vmmpp uses) the runtime's current context.
inline void init_cuda_runtime() {
    vmmpp::driver::check(::cudaSetDevice(0), "cudaSetDevice");
    vmmpp::driver::check(::cudaFree(nullptr), "cudaFree(nullptr)");
}

// ---------------------------------------------------------------------------------------------
// Timing

/// Wall-clock time of one call of `f`.
template <class F>
std::chrono::nanoseconds time_call(F&& f) {
    const auto start = std::chrono::steady_clock::now();
    std::forward<F>(f)();
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start);
}

inline double to_seconds(std::chrono::nanoseconds d) { return std::chrono::duration<double>(d).count(); }

/// Per-iteration samples of one benchmark run, reported as counters `<prefix>_p50`, `_p90`,
/// `_p99`, `_mean` (in the unit `scale` converts seconds to: 1e6 for microseconds). Google
/// Benchmark itself only reports the mean over a run; tails are what a serving engine feels.
class samples {
public:
    explicit samples(const benchmark::State& state) { values_.reserve(static_cast<std::size_t>(state.max_iterations)); }

    void add(double value) { values_.push_back(value); }
    [[nodiscard]] double sum() const { return std::accumulate(values_.begin(), values_.end(), 0.0); }

    void report(benchmark::State& state, const std::string& prefix, double scale) {
        if (values_.empty()) {
            return;
        }
        std::sort(values_.begin(), values_.end());
        const auto at = [&](double q) {
            return scale * values_[std::min(values_.size() - 1, static_cast<std::size_t>(q * values_.size()))];
        };
        state.counters[prefix + "_p50"] = at(0.50);
        state.counters[prefix + "_p90"] = at(0.90);
        state.counters[prefix + "_p99"] = at(0.99);
        state.counters[prefix + "_mean"] = scale * sum() / static_cast<double>(values_.size());
    }

private:
    std::vector<double> values_;
};

// ---------------------------------------------------------------------------------------------
// main

/// Records the GPU (or its absence) in the JSON context, then runs the benchmarks selected on
/// the command line. Returns main's exit status.
inline int run_benchmarks(int argc, char** argv) {
    benchmark::AddCustomContext("vmmpp_cuda_devices", std::to_string(vmmpp::driver::device_count()));
    if (has_gpu()) {
        try {
            cudaDeviceProp prop{};
            vmmpp::driver::check(::cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
            int driver = 0;
            int runtime = 0;
            (void)::cudaDriverGetVersion(&driver);
            (void)::cudaRuntimeGetVersion(&runtime);
            benchmark::AddCustomContext("vmmpp_gpu", prop.name);
            benchmark::AddCustomContext("vmmpp_cuda_driver", std::to_string(driver));
            benchmark::AddCustomContext("vmmpp_cuda_runtime", std::to_string(runtime));
            benchmark::AddCustomContext("vmmpp_vmm_granularity", std::to_string(vmmpp::vmm_granularity(0)));
        } catch (const std::exception& e) {
            benchmark::AddCustomContext("vmmpp_gpu", std::string("error: ") + e.what());
        }
    } else {
        benchmark::AddCustomContext("vmmpp_gpu", "none");
    }
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
        return 1;
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}

} // namespace vmmpp_bench
