// bench/bench_pool_growth.cpp: what it costs an elastic_pool to grow by one page and to give it
// back, per configuration, next to the raw operation the configuration wraps (its floor),
// measured in the same run.
//
// Why: growth sits on an engine's critical path (a sequence needs a new KV block now), so the
// pool must add nothing noticeable to what the driver itself costs (docs/ARCHITECTURE.md: about 40 us per
// 2 MiB handle on an H100, about 3 us per 2 MiB with 32 MiB handles).
//
// Every benchmark is one "grow then release" pair per iteration, both timed with steady_clock
// (manual time = the pair; no PauseTiming). The counters hold per-iteration percentiles of each
// half, in microseconds: grow_p50, grow_p90, grow_p99, grow_mean, and the same for release.
// `bytes` is what one grow commits, `commits` how many backing commits one grow made (1 for an
// elastic pool: the page was not committed; 0 for static_config, whose hold only accounts). The
// label names the floor the summary divides by.
//
//   subject                   grow                                     release
//   pool/<config>             ensure_committed(0, page)                release(0, page)
//   floor/vmm_<N>MiB          cuMemCreate + cuMemMap + cuMemSetAccess  cuMemUnmap + cuMemRelease
//   floor/vmm_<N>MiB_plain    the same, no exportable handle type
//   floor/cudaMalloc_2MiB     cudaMalloc                               cudaFree
//   floor/prefetch_32MiB      cudaMemPrefetchAsync to the GPU + sync   the same to the CPU
//   floor/host_2MiB           mprotect(RW)                             madvise(DONTNEED)+mprotect(NONE)
//
// GPU subjects skip with "no CUDA device" on a machine without one; host ones run anywhere.
#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/handles.hpp"

namespace {

using namespace vmmpp_bench;

/// Pool capacity: enough that the pool is not trivially small; growth cost does not depend on it.
/// Also keeps gh200_config's managed allocation at 1 GiB (see docs/ARCHITECTURE.md, "Managed memory").
constexpr std::size_t pool_capacity = GiB;

/// Grows a pool of `Config` by one page and gives it back.
template <class Config>
class pool_subject {
public:
    static constexpr bool needs_gpu = vmmpp_bench::needs_gpu<Config>;
    static std::string name() { return std::string("pool/") + config_name<Config>::value; }

    pool_subject() : pool_(make_pool<Config>(pool_capacity)) {}

    void grow() { pool_->ensure_committed(0, pool_->page_bytes()); }
    void release() { pool_->release(0, pool_->page_bytes()); }

    /// Bytes one grow commits: a whole growth unit, or nothing when the pool is preallocated.
    [[nodiscard]] std::size_t bytes() const {
        return Config::growth_type::is_elastic ? pool_->unit_bytes() : std::size_t{0};
    }
    [[nodiscard]] std::uint64_t commits() const { return pool_->stats().commits; }

private:
    std::unique_ptr<vmmpp::elastic_pool<Config>> pool_;
};

/// The raw driver sequence the vmm backing performs for one handle of `Bytes`, through vmmpp's
/// driver table, in device 0's primary context (current for the subject's whole life). With
/// `Exportable` the handle asks for a POSIX file descriptor handle type, as the backing does.
template <std::size_t Bytes, bool Exportable>
class raw_vmm {
public:
    static constexpr bool needs_gpu = true;
    static std::string name() {
        return "floor/vmm_" + std::to_string(Bytes / MiB) + "MiB" + (Exportable ? "" : "_plain");
    }

    raw_vmm()
        : context_(0),
          current_(context_),
          reservation_(Bytes, vmmpp::vmm_granularity(0)),
          prop_(vmmpp::device_allocation_prop(0)),
          driver_(vmmpp::driver::get()) {
        if (!Exportable) {
            prop_.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
        }
        access_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        access_.location.id = 0;
        access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    }

    void grow() {
        using vmmpp::driver::check;
        check(driver_.mem_create(&handle_, Bytes, &prop_, 0), "cuMemCreate");
        check(driver_.mem_map(reservation_.base(), Bytes, 0, handle_, 0), "cuMemMap");
        check(driver_.mem_set_access(reservation_.base(), Bytes, &access_, 1), "cuMemSetAccess");
    }
    void release() {
        using vmmpp::driver::check;
        check(driver_.mem_unmap(reservation_.base(), Bytes), "cuMemUnmap");
        check(driver_.mem_release(handle_), "cuMemRelease");
    }

    [[nodiscard]] std::size_t bytes() const { return Bytes; }
    [[nodiscard]] std::uint64_t commits() const { return 0; }

private:
    vmmpp::primary_context context_;
    vmmpp::scoped_context current_;
    vmmpp::address_reservation reservation_;
    CUmemAllocationProp prop_;
    CUmemAccessDesc access_{};
    const vmmpp::driver::api& driver_;
    CUmemGenericAllocationHandle handle_{};
};

/// cudaMalloc / cudaFree of `Bytes`: what a non-VMM allocator pays per allocation.
template <std::size_t Bytes>
class raw_cuda_malloc {
public:
    static constexpr bool needs_gpu = true;
    static std::string name() { return "floor/cudaMalloc_" + std::to_string(Bytes / MiB) + "MiB"; }

    raw_cuda_malloc() : context_(0) { init_cuda_runtime(); }

    void grow() { vmmpp::driver::check(::cudaMalloc(&p_, Bytes), "cudaMalloc"); }
    void release() { vmmpp::driver::check(::cudaFree(p_), "cudaFree"); }

    [[nodiscard]] std::size_t bytes() const { return Bytes; }
    [[nodiscard]] std::uint64_t commits() const { return 0; }

private:
    vmmpp::primary_context context_;
    void* p_ = nullptr;
};

/// Managed memory of `Bytes` moved to the GPU and back, as the managed_prefetch backing does
/// (preferred location the GPU, accessed by the CPU, one non-blocking stream).
template <std::size_t Bytes>
class raw_prefetch {
public:
    static constexpr bool needs_gpu = true;
    static std::string name() { return "floor/prefetch_" + std::to_string(Bytes / MiB) + "MiB"; }

    raw_prefetch() : context_(0) {
        using vmmpp::driver::check;
        init_cuda_runtime();
        check(::cudaMallocManaged(&p_, Bytes, cudaMemAttachGlobal), "cudaMallocManaged");
        device_.type = cudaMemLocationTypeDevice;
        device_.id = 0;
        host_.type = cudaMemLocationTypeHost;
        host_.id = 0;
        check(::cudaMemAdvise(p_, Bytes, cudaMemAdviseSetPreferredLocation, device_), "cudaMemAdvise");
        check(::cudaMemAdvise(p_, Bytes, cudaMemAdviseSetAccessedBy, host_), "cudaMemAdvise");
        check(::cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    }
    raw_prefetch(const raw_prefetch&) = delete;
    raw_prefetch& operator=(const raw_prefetch&) = delete;
    ~raw_prefetch() {
        (void)::cudaStreamDestroy(stream_);
        (void)::cudaFree(p_);
    }

    void grow() { move_to(device_); }
    void release() { move_to(host_); }

    [[nodiscard]] std::size_t bytes() const { return Bytes; }
    [[nodiscard]] std::uint64_t commits() const { return 0; }

private:
    void move_to(cudaMemLocation where) {
        vmmpp::driver::check(::cudaMemPrefetchAsync(p_, Bytes, where, 0, stream_), "cudaMemPrefetchAsync");
        vmmpp::driver::check(::cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }

    vmmpp::primary_context context_;
    void* p_ = nullptr;
    cudaMemLocation device_{};
    cudaMemLocation host_{};
    cudaStream_t stream_ = nullptr;
};

/// The system calls the host backing makes for `Bytes` of an mmap(PROT_NONE) reservation.
template <std::size_t Bytes>
class raw_host {
public:
    static constexpr bool needs_gpu = false;
    static std::string name() { return "floor/host_" + std::to_string(Bytes / MiB) + "MiB"; }

    raw_host() : p_(::mmap(nullptr, Bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)) {
        if (p_ == MAP_FAILED) {
            throw std::runtime_error(std::string("mmap: ") + std::strerror(errno));
        }
    }
    raw_host(const raw_host&) = delete;
    raw_host& operator=(const raw_host&) = delete;
    ~raw_host() { ::munmap(p_, Bytes); }

    void grow() { check(::mprotect(p_, Bytes, PROT_READ | PROT_WRITE), "mprotect"); }
    void release() {
        check(::madvise(p_, Bytes, MADV_DONTNEED), "madvise");
        check(::mprotect(p_, Bytes, PROT_NONE), "mprotect");
    }

    [[nodiscard]] std::size_t bytes() const { return Bytes; }
    [[nodiscard]] std::uint64_t commits() const { return 0; }

private:
    static void check(int rc, const char* call) {
        if (rc != 0) {
            throw std::runtime_error(std::string(call) + ": " + std::strerror(errno));
        }
    }
    void* p_;
};

/// Marks a subject that is itself a floor (compared with nothing).
struct no_floor {};

/// One grow + release per iteration of `Subject`; see the file comment for the counters.
template <class Subject, class Floor>
void BM_growth(benchmark::State& state) {
    auto subject = make_or_skip<Subject, Subject::needs_gpu>(state);
    if (!subject) {
        return;
    }
    samples grow(state);
    samples release(state);
    const std::uint64_t commits_before = subject->commits();
    try {
        for (auto _ : state) {
            const auto g = time_call([&] { subject->grow(); });
            const auto r = time_call([&] { subject->release(); });
            grow.add(to_seconds(g));
            release.add(to_seconds(r));
            state.SetIterationTime(to_seconds(g + r));
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    grow.report(state, "grow", 1e6);
    release.report(state, "release", 1e6);
    state.counters["bytes"] = static_cast<double>(subject->bytes());
    state.counters["commits"] =
        static_cast<double>(subject->commits() - commits_before) / static_cast<double>(state.iterations());
    if constexpr (!std::is_same_v<Floor, no_floor>) {
        state.SetLabel("floor=" + Floor::name());
    }
}

using vmm_2MiB = raw_vmm<2 * MiB, true>;
using vmm_2MiB_plain = raw_vmm<2 * MiB, false>;
using vmm_32MiB = raw_vmm<32 * MiB, true>;
using cuda_malloc_2MiB = raw_cuda_malloc<2 * MiB>;
using prefetch_32MiB = raw_prefetch<32 * MiB>;
using host_2MiB = raw_host<2 * MiB>;

using elastic = pool_subject<vmmpp::elastic_config>;
using chunked16 = pool_subject<vmm_chunked16_config>;
using gh200 = pool_subject<vmmpp::gh200_config>;
using static_pool = pool_subject<vmmpp::static_config>;
using host_pool = pool_subject<vmmpp::host_config>;
using vmm_zeroing = pool_subject<vmm_zeroing_config>;
using host_zeroing = pool_subject<host_zeroing_config>;

// Registered as "<subject name>"; each pool runs right after its floor, so slow drift of the
// machine touches both alike.
#define VMMPP_BENCH_GROWTH(Subject, Floor)          \
    BENCHMARK_TEMPLATE(BM_growth, Subject, Floor) \
        ->Name(Subject::name())                   \
        ->UseManualTime()                         \
        ->Unit(benchmark::kMicrosecond)

VMMPP_BENCH_GROWTH(vmm_2MiB, no_floor);
VMMPP_BENCH_GROWTH(vmm_2MiB_plain, no_floor);
VMMPP_BENCH_GROWTH(elastic, vmm_2MiB);
VMMPP_BENCH_GROWTH(vmm_32MiB, no_floor);
VMMPP_BENCH_GROWTH(chunked16, vmm_32MiB);
VMMPP_BENCH_GROWTH(prefetch_32MiB, no_floor);
VMMPP_BENCH_GROWTH(gh200, prefetch_32MiB);
VMMPP_BENCH_GROWTH(cuda_malloc_2MiB, no_floor);
VMMPP_BENCH_GROWTH(static_pool, cuda_malloc_2MiB);
VMMPP_BENCH_GROWTH(host_2MiB, no_floor);
VMMPP_BENCH_GROWTH(host_pool, host_2MiB);
VMMPP_BENCH_GROWTH(vmm_zeroing, vmm_2MiB);
VMMPP_BENCH_GROWTH(host_zeroing, host_2MiB);

} // namespace

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
