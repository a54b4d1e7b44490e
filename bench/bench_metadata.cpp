// bench/bench_metadata.cpp: host memory an elastic_pool spends on bookkeeping, per GiB of pool,
// per configuration: when the pool is empty and when every page is held (so committed).
//
// Why: an engine reserves address space for its largest batch, often tens of GiB per model, on
// a host that also holds weights and pinned buffers; the pool's metadata should stay a few KiB
// per GiB whatever the capacity.
//
// It is measured, not estimated: this program replaces the global operator new/delete with ones
// that count live heap bytes (malloc_usable_size: what the allocator really hands out), and a
// benchmark takes the difference around building the pool and around holding every page. What
// the counts should come to, per 2 MiB page p and growth unit u (pool.hpp, backing/*.hpp):
//   pool     page_holds_ 4 B/p + unit_held_pages_ 4 B/u + unit_committed_ 1 bit/u
//            + idle_ (std::set) one ~48 B node per committed unit nothing holds
//   backing  commit_map 1 bit per granule; vmm: one std::map node (~96 B) per live handle
//   fixed    the pool object itself, a shared_budget's state, the vmm access list
// So about 4 KiB per GiB empty (512 pages), plus ~48 KiB per committed GiB with 2 MiB handles.
// Driver-side memory (libcuda's own tables) is not C++ heap and not counted.
//
// Counters: capacity_GiB, empty_bytes / full_bytes (heap bytes the pool holds), and the same per
// GiB of capacity: empty_per_GiB, full_per_GiB. Each benchmark runs once (a byte count does not
// vary); GPU configurations skip with "no CUDA device" on a machine without one.
#include <malloc.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>
#include <type_traits>

#include "common.hpp"

namespace {

std::atomic<std::ptrdiff_t> live_heap_bytes{0};

void* counted_alloc(std::size_t n) {
    void* p = std::malloc(n == 0 ? 1 : n);
    if (p == nullptr) {
        throw std::bad_alloc();
    }
    live_heap_bytes.fetch_add(static_cast<std::ptrdiff_t>(::malloc_usable_size(p)), std::memory_order_relaxed);
    return p;
}

void counted_free(void* p) noexcept {
    if (p != nullptr) {
        live_heap_bytes.fetch_sub(static_cast<std::ptrdiff_t>(::malloc_usable_size(p)), std::memory_order_relaxed);
        std::free(p);
    }
}

} // namespace

// The replaceable global allocation functions (the over-aligned ones keep their defaults: the
// pool allocates nothing over-aligned).
void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    try {
        return counted_alloc(n);
    } catch (...) {
        return nullptr;
    }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_free(p); }

namespace {

using namespace vmmpp_bench;

/// Capacity per configuration: large enough that fixed costs fade; managed memory kept at 1 GiB.
template <class Config>
constexpr std::size_t capacity_of = std::is_same_v<Config, vmmpp::gh200_config> ? GiB : 4 * GiB;

template <class Config>
void BM_metadata(benchmark::State& state) {
    if (needs_gpu<Config> && !has_gpu()) {
        state.SkipWithError("no CUDA device");
        return;
    }
    constexpr std::size_t capacity = capacity_of<Config>;
    std::ptrdiff_t empty = 0;
    std::ptrdiff_t full = 0;
    try {
        {  // warm-up: the CUDA runtime and libraries allocate once on first use; not the pool's
            auto pool = make_pool<Config>(capacity);
            pool->ensure_committed(0, 1);
            pool->release(0, 1);
        }
        for (auto _ : state) {
            const std::ptrdiff_t before = live_heap_bytes.load();
            auto pool = make_pool<Config>(capacity);
            empty = live_heap_bytes.load() - before;
            pool->ensure_committed(0, capacity);
            full = live_heap_bytes.load() - before;
            pool->release(0, capacity);
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    const double gib = static_cast<double>(capacity) / static_cast<double>(GiB);
    state.counters["capacity_GiB"] = gib;
    state.counters["empty_bytes"] = static_cast<double>(empty);
    state.counters["full_bytes"] = static_cast<double>(full);
    state.counters["empty_per_GiB"] = static_cast<double>(empty) / gib;
    state.counters["full_per_GiB"] = static_cast<double>(full) / gib;
}

#define VMMPP_BENCH_METADATA(Config)                                                                   \
    BENCHMARK_TEMPLATE(BM_metadata, Config)                                                            \
        ->Name(std::string("pool/") + config_name<Config>::value)                                      \
        ->Iterations(1)                                                                                \
        ->Repetitions(1)                                                                               \
        ->Unit(benchmark::kMillisecond)

VMMPP_BENCH_METADATA(vmmpp::host_config);
VMMPP_BENCH_METADATA(vmmpp::elastic_config);
VMMPP_BENCH_METADATA(vmm_chunked16_config);
VMMPP_BENCH_METADATA(vmmpp::static_config);
VMMPP_BENCH_METADATA(vmmpp::gh200_config);

} // namespace

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
