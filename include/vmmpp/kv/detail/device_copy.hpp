// vmmpp/kv/detail/device_copy.hpp: every copy the kv headers make, in one place, so that only
// this header talks to CUDA: a cache's own copies (copy-on-write, sleep and wake, block tables)
// and copy_blocks between two caches. Host memory is copied with std::memcpy; device-visible
// memory with cuMemcpyAsync (in the device's primary context) or the runtime's async copies.
// Not cudaMemcpy2DAsync: on VMM memory a block's pieces lie in different physical allocations
// with unmapped pages between them, which a 2D copy rejects.
#pragma once

#include <cuda_runtime_api.h>

#include <concepts>
#include <cstddef>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"

namespace vmmpp::detail {

/// A kv_cache's own copies within its memory and to or from host buffers, for a cache over
/// `Backing` on device `device` (-1: host memory).
template <class Backing>
class device_copy {
public:
    /// Whether the cache's memory is device-visible: copies are queued on a stream.
    static constexpr bool on_device = has_property<Backing, device_accessible>;

    explicit device_copy(int device) noexcept : device_(device) {}

    /// Calls `pieces(copy)`, where each copy(to, from, bytes) is queued on `stream` (device
    /// memory: one cuMemcpyAsync each, `who` naming a failure) or done at once (host memory).
    template <class Pieces>
    void copy(cudaStream_t stream, const char* who, Pieces&& pieces) {
        if constexpr (on_device) {
            scoped_context current(context());
            pieces([&](std::byte* to, const std::byte* from, std::size_t bytes) {
                driver::check(driver::get().memcpy_async(reinterpret_cast<CUdeviceptr>(to),
                                                         reinterpret_cast<CUdeviceptr>(from), bytes, stream),
                              who);
            });
        } else {
            pieces([](std::byte* to, const std::byte* from, std::size_t bytes) { std::memcpy(to, from, bytes); });
        }
    }

    /// Queues the copy of `bytes` bytes of host memory to device memory `device_out` on `stream`
    /// (block tables). From a host cache the runtime finds the device of `device_out`.
    void upload(void* device_out, const void* host, std::size_t bytes, cudaStream_t stream) {
        if (device_ < 0) {
            driver::check(::cudaMemcpyAsync(device_out, host, bytes, cudaMemcpyHostToDevice, stream),
                          "cudaMemcpyAsync(block tables)");
            return;
        }
        scoped_context current(context());
        driver::check(driver::get().memcpy_htod_async(reinterpret_cast<CUdeviceptr>(device_out), host, bytes, stream),
                      "cuMemcpyHtoDAsync(block tables)");
    }

private:
    /// The device's primary context, retained on the first device copy.
    const primary_context& context() {
        if (!context_) {
            context_.emplace(device_);
        }
        return *context_;
    }

    int device_;
    std::optional<primary_context> context_;
};

/// Whether `device` may access the memory of backing `b` directly: a vmm backing that maps its
/// pages for that device (vmm_options::peer_devices). Other backings are not asked (false).
template <class B>
[[nodiscard]] bool grants_access(const B& b, int device) noexcept {
    if constexpr (requires { { b.grants_access(device) } -> std::same_as<bool>; }) {
        return b.grants_access(device);
    } else {
        return false;
    }
}

/// Queues the copies to[i] <- from[i] (bytes[i] each) on `stream` as one cudaMemcpyBatchAsync,
/// the sources read in stream order. `stream` must not be the legacy default stream, which the
/// batch API refuses.
inline void copy_batch_async(std::span<void* const> to, std::span<const void* const> from,
                             std::span<const std::size_t> bytes, cudaStream_t stream, const char* who) {
    if (to.empty()) {
        return;
    }
    cudaMemcpyAttributes attributes{};
    attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    std::size_t first_attribute = 0;
#if CUDART_VERSION >= 13000
    driver::check(::cudaMemcpyBatchAsync(to.data(), from.data(), bytes.data(), to.size(), &attributes, &first_attribute,
                                         1, stream),
                  who);
#else  // CUDA 12.8 and 12.9: non-const arrays, and the index of a failed copy (unused: the error names the call)
    std::size_t failed = 0;
    driver::check(::cudaMemcpyBatchAsync(const_cast<void**>(to.data()), const_cast<void**>(from.data()),
                                         const_cast<std::size_t*>(bytes.data()), to.size(), &attributes,
                                         &first_attribute, 1, &failed, stream),
                  who);
#endif
}

/// The copies of one copy_blocks call between a cache over `SrcBacking` on `src_device` and one
/// over `DstBacking` on `dst_device`, chosen from the backings' properties and devices:
/// - both in host memory only: std::memcpy, done at once; `stream` is not used;
/// - device to device, when `stream` is not the legacy default stream (which the batch API
///   refuses) and, between GPUs, both backings map their pages for the other device: every
///   piece in one cudaMemcpyBatchAsync, queued by finish() (docs/NIXL.md has the measurements);
/// - otherwise between GPUs: cudaMemcpyPeerAsync on `stream`;
/// - otherwise (one device, or host and device memory mixed): cudaMemcpyAsync (cudaMemcpyDefault).
template <class SrcBacking, class DstBacking>
class transfer_copy {
    static constexpr bool src_on_device = has_property<SrcBacking, device_accessible>;
    static constexpr bool dst_on_device = has_property<DstBacking, device_accessible>;
    static_assert(src_on_device || has_property<SrcBacking, host_accessible>,
                  "vmmpp::copy_blocks: the source backing is neither device_accessible nor host_accessible");
    static_assert(dst_on_device || has_property<DstBacking, host_accessible>,
                  "vmmpp::copy_blocks: the destination backing is neither device_accessible nor host_accessible");

public:
    transfer_copy(const SrcBacking& src, int src_device, const DstBacking& dst, int dst_device, cudaStream_t stream)
        : src_device_(src_device), dst_device_(dst_device), stream_(stream),
          peer_(src_on_device && dst_on_device && src_device >= 0 && dst_device >= 0 && src_device != dst_device) {
        if constexpr (src_on_device && dst_on_device && !has_property<SrcBacking, host_accessible> &&
                      !has_property<DstBacking, host_accessible>) {
            batched_ = stream != nullptr &&
                       (!peer_ || (grants_access(src, dst_device) && grants_access(dst, src_device)));
        }
    }

    /// Copies (or queues, or adds to the batch) `bytes` bytes from `from` to `to`.
    void operator()(std::byte* to, const std::byte* from, std::size_t bytes) {
        if constexpr (!src_on_device && !dst_on_device) {
            std::memcpy(to, from, bytes);
        } else if (batched_) {
            to_.push_back(to);
            from_.push_back(from);
            bytes_.push_back(bytes);
        } else if (peer_) {
            driver::check(::cudaMemcpyPeerAsync(to, dst_device_, from, src_device_, bytes, stream_),
                          "cudaMemcpyPeerAsync(copy_blocks)");
        } else {
            driver::check(::cudaMemcpyAsync(to, from, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync(copy_blocks)");
        }
    }

    /// Queues the batch, if the copies were batched.
    void finish() {
        if (batched_) {
            copy_batch_async(to_, from_, bytes_, stream_, "cudaMemcpyBatchAsync(copy_blocks)");
        }
    }

private:
    int src_device_;
    int dst_device_;
    cudaStream_t stream_;
    bool peer_;
    bool batched_ = false;
    std::vector<void*> to_;  // the pieces, when they go in one batch
    std::vector<const void*> from_;
    std::vector<std::size_t> bytes_;
};

} // namespace vmmpp::detail
