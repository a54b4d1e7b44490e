// vmmpp_torch_allocator.cpp: PyTorch's CUDA allocator over vmmpp, loaded with
// torch.cuda.memory.CUDAPluggableAllocator(path, "vmmpp_malloc", "vmmpp_free") (see
// use_with_torch.py). Each device gets a span_allocator over an elastic pool, so the device
// memory PyTorch holds follows its live tensors, 2 MiB page by 2 MiB page.
//
// Environment, read at the first allocation:
//   VMMPP_ALLOCATOR             vmm (default): CUDA virtual memory, page-granular growth;
//                               managed: managed memory, as on GH200, where allocations smaller
//                               than VMMPP_PREFETCH_THRESHOLD are prefetched to the device on
//                               their stream and larger ones fault in on demand
//   VMMPP_PREFETCH_THRESHOLD    bytes (K, M, G suffixes: KiB, MiB, GiB); default 2G
//   VMMPP_ALLOCATOR_CAPACITY    bytes of address space per device; default: the device's total
//                               memory (vmm), 90% of its free memory (managed: a GPU that is not
//                               coherent with the CPU must not get more managed memory than is free)
//   VMMPP_ALLOCATOR_SPARE_PAGES empty 2 MiB pages kept committed for the next growth; default 0
//
// A failed allocation prints why on stderr and returns NULL, which PyTorch does not expect:
// size the capacity for the workload. The allocators live until the process ends (never
// destroyed: PyTorch frees tensors during interpreter shutdown, after static destructors).
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>

#include "span_allocator.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/driver/device.hpp"

namespace {

constexpr std::size_t page = std::size_t{2} << 20;

/// Bytes from an environment variable ("512M", "2G", "1048576"), or `fallback` when unset.
std::size_t env_bytes(const char* name, std::size_t fallback) {
    const char* text = std::getenv(name);
    if (text == nullptr || *text == '\0') {
        return fallback;
    }
    char* end = nullptr;
    std::size_t value = std::strtoull(text, &end, 10);
    switch (std::toupper(static_cast<unsigned char>(*end))) {
    case 'K': value <<= 10; break;
    case 'M': value <<= 20; break;
    case 'G': value <<= 30; break;
    default: break;
    }
    return value;
}

struct settings {
    bool managed = false;
    std::size_t prefetch_threshold = std::size_t{2} << 30;
    std::size_t capacity = 0;  // 0: the default for the kind
    std::size_t spare_pages = 0;

    static const settings& get() {
        static const settings s = [] {
            settings r;
            const char* kind = std::getenv("VMMPP_ALLOCATOR");
            r.managed = kind != nullptr && std::string_view(kind) == "managed";
            r.prefetch_threshold = env_bytes("VMMPP_PREFETCH_THRESHOLD", r.prefetch_threshold);
            r.capacity = env_bytes("VMMPP_ALLOCATOR_CAPACITY", 0);
            r.spare_pages = env_bytes("VMMPP_ALLOCATOR_SPARE_PAGES", 0);
            return r;
        }();
        return s;
    }
};

/// One device's allocator, whatever its pool configuration.
class device_allocator {
public:
    virtual ~device_allocator() = default;
    virtual void* allocate(std::size_t bytes, cudaStream_t stream) = 0;
    virtual void deallocate(void* p, std::size_t bytes, cudaStream_t stream) = 0;
    virtual vmmpp_torch::span_allocator_stats stats() const = 0;
    virtual std::size_t trim() = 0;
};

using vmm_pool_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::unlimited>;
// Threshold 0: the backing never prefetches on commit; the allocator prefetches small
// allocations itself, on their stream.
using managed_pool_config = vmmpp::pool_config<vmmpp::managed_prefetch<0>, vmmpp::page_granular, vmmpp::unlimited>;

template <class Config>
class device_allocator_impl final : public device_allocator {
public:
    device_allocator_impl(int device, std::size_t capacity, const settings& s)
        : device_(device),
          prefetch_threshold_(s.prefetch_threshold),
          span_(capacity, typename Config::backing_type::options{.device = device},
                vmmpp::page_granular{.spare_pages = s.spare_pages}) {}

    void* allocate(std::size_t bytes, cudaStream_t stream) override {
        void* p = span_.allocate(bytes, stream);
        if constexpr (std::is_same_v<Config, managed_pool_config>) {
            if (p != nullptr && bytes < prefetch_threshold_) {
                cudaMemLocation to{};
                to.type = cudaMemLocationTypeDevice;
                to.id = device_;
                if (::cudaMemPrefetchAsync(p, bytes, to, 0, stream) != cudaSuccess) {
                    (void)::cudaGetLastError();  // a hint only: the pages fault in instead
                }
            }
        }
        return p;
    }
    void deallocate(void* p, std::size_t bytes, cudaStream_t stream) override { span_.deallocate(p, bytes, stream); }
    vmmpp_torch::span_allocator_stats stats() const override { return span_.stats(); }
    std::size_t trim() override { return span_.trim(); }

private:
    int device_;
    std::size_t prefetch_threshold_;
    vmmpp_torch::span_allocator<Config, vmmpp_torch::cuda_events> span_;
};

constexpr int max_devices = 64;
std::array<std::atomic<device_allocator*>, max_devices> allocators{};
std::mutex creation;

/// Makes `device` current for the scope (events and streams belong to it).
class device_guard {
public:
    explicit device_guard(int device) {
        vmmpp::driver::check(::cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) {
            vmmpp::driver::check(::cudaSetDevice(device), "cudaSetDevice");
        }
    }
    device_guard(const device_guard&) = delete;
    device_guard& operator=(const device_guard&) = delete;
    ~device_guard() {
        int now = previous_;
        if (::cudaGetDevice(&now) == cudaSuccess && now != previous_) {
            (void)::cudaSetDevice(previous_);
        }
    }

private:
    int previous_ = 0;
};

device_allocator& allocator_for(int device) {
    if (device < 0 || device >= max_devices) {
        throw vmmpp::invalid_argument("device " + std::to_string(device) + " outside 0.." +
                                      std::to_string(max_devices - 1));
    }
    if (device_allocator* a = allocators[static_cast<std::size_t>(device)].load(std::memory_order_acquire)) {
        return *a;
    }
    std::lock_guard lock(creation);
    if (device_allocator* a = allocators[static_cast<std::size_t>(device)].load(std::memory_order_acquire)) {
        return *a;
    }
    const settings& s = settings::get();
    std::size_t capacity = s.capacity;
    if (capacity == 0) {
        const vmmpp::device_memory_info mem = vmmpp::device_memory(device);
        capacity = s.managed ? mem.free / 10 * 9 : mem.total;
    }
    capacity = (capacity + page - 1) / page * page;
    std::unique_ptr<device_allocator> made;
    if (s.managed) {
        made = std::make_unique<device_allocator_impl<managed_pool_config>>(device, capacity, s);
    } else {
        made = std::make_unique<device_allocator_impl<vmm_pool_config>>(device, capacity, s);
    }
    device_allocator* a = made.release();  // lives until the process ends
    allocators[static_cast<std::size_t>(device)].store(a, std::memory_order_release);
    return *a;
}

void report(const char* what, const std::exception& e) { std::fprintf(stderr, "vmmpp allocator: %s: %s\n", what, e.what()); }

} // namespace

/// Statistics of one device's allocator, for Python (ctypes).
struct vmmpp_allocator_stats {
    std::uint64_t capacity;
    std::uint64_t live_bytes;
    std::uint64_t live_blocks;
    std::uint64_t peak_live_bytes;
    std::uint64_t pending_frees;
    std::uint64_t pending_bytes;
    std::uint64_t free_ranges;
    std::uint64_t largest_free;
    std::uint64_t committed_bytes;
};

#define VMMPP_TORCH_API extern "C" __attribute__((visibility("default")))

/// PyTorch's allocation hook: a block of `size` bytes on `device`, to be used on `stream`.
VMMPP_TORCH_API void* vmmpp_malloc(std::size_t size, int device, cudaStream_t stream) {
    try {
        device_guard current(device);
        return allocator_for(device).allocate(size, stream);
    } catch (const std::exception& e) {
        report("malloc", e);
        return nullptr;
    }
}

/// PyTorch's free hook: the block goes back once the work queued on `stream` so far is done.
VMMPP_TORCH_API void vmmpp_free(void* ptr, std::size_t size, int device, cudaStream_t stream) {
    if (ptr == nullptr) {
        return;
    }
    try {
        device_guard current(device);
        allocator_for(device).deallocate(ptr, size, stream);
    } catch (const std::exception& e) {
        report("free", e);
    }
}

/// Fills `out` for `device`; 0 on success, -1 (and a message on stderr) otherwise.
VMMPP_TORCH_API int vmmpp_allocator_stats_get(int device, vmmpp_allocator_stats* out) {
    try {
        device_guard current(device);
        const vmmpp_torch::span_allocator_stats s = allocator_for(device).stats();
        *out = vmmpp_allocator_stats{s.capacity,      s.live_bytes,   s.live_blocks,  s.peak_live_bytes,
                                     s.pending_frees, s.pending_bytes, s.free_ranges, s.largest_free,
                                     s.committed_bytes};
        return 0;
    } catch (const std::exception& e) {
        report("stats", e);
        return -1;
    }
}

/// Waits for pending frees on `device` and gives spare pages back; the bytes given back.
VMMPP_TORCH_API std::size_t vmmpp_allocator_trim(int device) {
    try {
        device_guard current(device);
        return allocator_for(device).trim();
    } catch (const std::exception& e) {
        report("trim", e);
        return 0;
    }
}

/// "vmm" or "managed": the kind VMMPP_ALLOCATOR selected.
VMMPP_TORCH_API const char* vmmpp_allocator_kind() { return settings::get().managed ? "managed" : "vmm"; }
