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
#include <utility>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/event.hpp"

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

/// The context `stream` belongs to (cuStreamGetCtx: for the legacy default stream, the calling
/// thread's current one). Throws: cuda_error (no context current for the legacy stream).
[[nodiscard]] inline CUcontext stream_context(cudaStream_t stream) {
    CUcontext ctx = nullptr;
    driver::check(driver::get().stream_get_ctx(stream, &ctx), "cuStreamGetCtx(copy_blocks)");
    return ctx;
}

/// Makes `to`, a stream of context `to_ctx`, wait for the work queued so far on `from`, a stream
/// of `from_ctx`, which may be another device's: an event records only on a stream of its own
/// context, but cuStreamWaitEvent takes one of any device. The event is temporary: destroyed at
/// once, the driver keeps what the queued wait needs. Each stream is used with its context
/// current, so the legacy default stream (nullptr) means that context's.
inline void order_streams(cudaStream_t from, CUcontext from_ctx, cudaStream_t to, CUcontext to_ctx) {
    scoped_context in_from(from_ctx);
    const stream_event e = stream_event::create();
    e.record(from);
    scoped_context in_to(to_ctx);
    driver::check(driver::get().stream_wait_event(to, e.get(), 0), "cuStreamWaitEvent(copy_blocks)");
}

/// Where the stream of a copy_blocks call between caches on devices `src_device` and `dst_device`
/// (-1: host memory) is, for its stream order (copy_order, kv/transfer.hpp): a cache on another
/// device than the stream cannot record an event on it, so its own stream stands in, ordered with
/// `stream` by order_streams. The stream's context is asked only when the caches are on two
/// different GPUs: caches on one device never take this path.
class stream_devices {
public:
    enum side : int { source = 0, destination = 1 };

    stream_devices(cudaStream_t stream, int src_device, int dst_device) : stream_(stream) {
        if (src_device >= 0 && dst_device >= 0 && src_device != dst_device) {
            ctx_ = stream_context(stream);
            for (const auto& [s, device] : {std::pair{source, src_device}, std::pair{destination, dst_device}}) {
                if (primary_context p(device); p.get() != ctx_) {
                    elsewhere_[s].emplace(std::move(p));
                }
            }
        }
    }
    /// Whether the cache of `s` is on another device than the stream.
    [[nodiscard]] bool elsewhere(side s) const noexcept { return elsewhere_[s].has_value(); }
    /// The stream waits for the work queued so far on `own`, the stream of the cache of `s`
    /// (elsewhere(s)).
    void stream_waits_for(side s, cudaStream_t own) { order_streams(own, elsewhere_[s]->get(), stream_, ctx_); }
    /// `own`, the stream of the cache of `s` (elsewhere(s)), waits for the work queued so far on
    /// the stream.
    void waits_for_stream(side s, cudaStream_t own) { order_streams(stream_, ctx_, own, elsewhere_[s]->get()); }

private:
    cudaStream_t stream_;
    CUcontext ctx_ = nullptr;
    std::optional<primary_context> elsewhere_[2];  // by side: the cache's device, if not the stream's
};

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
/// - between device and page-locked host memory (pinned_host), likewise in one batch when
///   `stream` is not the legacy default stream;
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
        } else if constexpr ((src_on_device && has_property<DstBacking, page_locked>) ||
                             (dst_on_device && has_property<SrcBacking, page_locked>)) {
            batched_ = stream != nullptr;  // GPU and pinned host memory: DMA, one batch
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
