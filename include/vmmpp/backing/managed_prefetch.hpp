// vmmpp/backing/managed_prefetch.hpp: managed (unified) memory for GH200-class machines, where
// the GPU reads CPU memory coherently. Small committed pieces are prefetched to the GPU; large
// ranges fault in on demand. On a GPU that is not coherent with the CPU (x86 + H100) asking for
// more managed memory than the device has free can hang the GPU, so such a capacity is refused.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/commit_map.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/device.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

namespace detail {
// CUDA 13 gives cudaMemAdvise and cudaMemPrefetchAsync a cudaMemLocation; CUDA 12 has that form
// (from 12.2) as cudaMemAdvise_v2 and cudaMemPrefetchAsync_v2, the plain names taking a device id.
inline cudaError_t mem_advise(const void* p, std::size_t bytes, cudaMemoryAdvise advice, cudaMemLocation where) {
#if CUDART_VERSION >= 13000
    return ::cudaMemAdvise(p, bytes, advice, where);
#else
    return ::cudaMemAdvise_v2(p, bytes, advice, where);
#endif
}
inline cudaError_t mem_prefetch_async(const void* p, std::size_t bytes, cudaMemLocation to, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
    return ::cudaMemPrefetchAsync(p, bytes, to, 0, stream);
#else
    return ::cudaMemPrefetchAsync_v2(p, bytes, to, 0, stream);
#endif
}
} // namespace detail

/// Construction options of vmmpp::managed.
struct managed_prefetch_options {
    int device = 0;
    std::size_t page_bytes = detail::default_page_bytes;
};

/// Managed backing: cudaMallocManaged of the capacity, preferred location the device, accessed
/// by the CPU. `commit` prefetches the range to the device when it is at most `ThresholdBytes`
/// (2 GiB by default, as in the GH200 seed); `decommit` prefetches it back to the CPU, the
/// portable way to take it off the device.
template <std::size_t ThresholdBytes = (std::size_t{2} << 30)>
class managed_prefetch {
public:
    using options = managed_prefetch_options;
    static constexpr bool is_elastic = true;
    static constexpr std::size_t prefetch_threshold = ThresholdBytes;

    explicit managed_prefetch(std::size_t capacity, options opts = {})
        : context_(opts.device), pages_(capacity, opts.page_bytes), device_(opts.device) {
        scoped_context current(context_);
        const bool coherent =
            device_attribute(device_, CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES) != 0;
        if (!coherent) {
            const device_memory_info mem = device_memory(device_);
            if (capacity > mem.free) {
                throw out_of_memory("managed memory on a device not coherent with the CPU may not exceed its free "
                                    "memory (device " + std::to_string(device_) + ")",
                                    capacity, 0, mem.free);
            }
        }
        if (device_attribute(device_, CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS) == 0) {
            throw invalid_argument("device " + std::to_string(device_) +
                                   " has no concurrent managed access: managed_prefetch needs it");
        }
        void* p = nullptr;
        driver::check(::cudaMallocManaged(&p, capacity, cudaMemAttachGlobal), "cudaMallocManaged");
        base_ = static_cast<std::byte*>(p);
        try {
            driver::check(detail::mem_advise(base_, capacity, cudaMemAdviseSetPreferredLocation, device_location()),
                          "cudaMemAdvise(SetPreferredLocation)");
            driver::check(detail::mem_advise(base_, capacity, cudaMemAdviseSetAccessedBy, host_location()),
                          "cudaMemAdvise(SetAccessedBy)");
            driver::check(::cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        } catch (...) {
            (void)::cudaFree(base_);
            throw;
        }
    }
    managed_prefetch(const managed_prefetch&) = delete;
    managed_prefetch& operator=(const managed_prefetch&) = delete;
    ~managed_prefetch() {
        scoped_context current(context_);
        (void)::cudaStreamDestroy(stream_);
        (void)::cudaFree(base_);
    }

    [[nodiscard]] std::size_t granularity() const noexcept { return pages_.granularity(); }
    [[nodiscard]] std::byte* base() const noexcept { return base_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return pages_.capacity(); }
    [[nodiscard]] std::size_t committed_bytes() const noexcept { return pages_.committed_bytes(); }
    [[nodiscard]] int device_ordinal() const noexcept { return device_; }

    /// Prefetches the range to the device when it is at most the threshold. Strong guarantee.
    void commit(std::size_t offset, std::size_t bytes) {
        pages_.check("commit", offset, bytes, false);
        if (bytes <= ThresholdBytes) {
            migrate(offset, bytes, device_location(), "cudaMemPrefetchAsync(device)");
        }
        pages_.mark(offset, bytes, true);
    }

    /// Moves the range back to the CPU, off the device.
    void decommit(std::size_t offset, std::size_t bytes) {
        pages_.check("decommit", offset, bytes, true);
        migrate(offset, bytes, host_location(), "cudaMemPrefetchAsync(host)");
        pages_.mark(offset, bytes, false);
    }

    friend constexpr void get_property(const managed_prefetch&, device_accessible) noexcept {}
    friend constexpr void get_property(const managed_prefetch&, host_accessible) noexcept {}

private:
    [[nodiscard]] cudaMemLocation device_location() const noexcept {
        cudaMemLocation loc{};
        loc.type = cudaMemLocationTypeDevice;
        loc.id = device_;
        return loc;
    }
    [[nodiscard]] static cudaMemLocation host_location() noexcept {
        cudaMemLocation loc{};
        loc.type = cudaMemLocationTypeHost;
        loc.id = 0;
        return loc;
    }
    void migrate(std::size_t offset, std::size_t bytes, cudaMemLocation to, const char* call) {
        scoped_context current(context_);
        driver::check(detail::mem_prefetch_async(base_ + offset, bytes, to, stream_), call);
        driver::check(::cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }

    primary_context context_;
    detail::commit_map pages_;
    int device_;
    std::byte* base_ = nullptr;
    cudaStream_t stream_ = nullptr;
};

static_assert(backing<managed_prefetch<>>, "vmmpp::managed_prefetch must model vmmpp::backing");

} // namespace vmmpp
