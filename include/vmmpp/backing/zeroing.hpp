// vmmpp/backing/zeroing.hpp: zeroing<Upstream>, a backing adaptor that zeroes every range it
// commits before commit returns: the "zero on reuse" option. Physical memory that one model's
// pool gave back (to the driver, or to a buffer several pools are built over in turn) holds that
// model's keys and values; over zeroing<...> another model's pool never reads them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/backing_adaptor.hpp"
#include "vmmpp/backing/external.hpp"
#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

namespace detail {

/// Zeroes committed host memory with std::memset.
template <bool OnDevice>
class zeroer {
public:
    explicit zeroer(int /*device*/) noexcept {}
    void zero(std::byte* p, std::size_t bytes) noexcept { std::memset(p, 0, bytes); }
};

/// Zeroes committed device memory with cudaMemsetAsync on a stream of its own, in the device's
/// primary context, and waits for it.
template <>
class zeroer<true> {
public:
    explicit zeroer(int device) : context_(checked(device)) {
        scoped_context current(context_);
        driver::check(::cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    }
    zeroer(const zeroer&) = delete;
    zeroer& operator=(const zeroer&) = delete;
    ~zeroer() {
        scoped_context current(context_);
        (void)::cudaStreamDestroy(stream_);
    }
    void zero(std::byte* p, std::size_t bytes) {
        scoped_context current(context_);
        driver::check(::cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync(zeroing)");
        driver::check(::cudaStreamSynchronize(stream_), "cudaStreamSynchronize(zeroing)");
    }

private:
    static int checked(int device) {
        if (device < 0) {
            throw invalid_argument("vmmpp::zeroing over device memory needs the memory's CUDA device, and the "
                                   "backing reports none (set external_options::device)");
        }
        return device;
    }
    primary_context context_;
    cudaStream_t stream_ = nullptr;
};

} // namespace detail

/// A backing adaptor that forwards to `Upstream` and zeroes every range it commits.
///
/// Where: memory a kernel can reach (`device_accessible`, managed memory included, whose
/// committed pages the managed backing has just prefetched to the GPU) is zeroed on the device
/// with cudaMemsetAsync + cudaStreamSynchronize on a stream of the adaptor's own; host-only
/// memory (`host_accessible`) with std::memset. A backing with neither property is rejected at
/// compile time.
///
/// What it covers: the zeroing happens when the pool commits a unit, i.e. when memory comes
/// (back) to the pool. A block a cache frees and takes again while its page stays committed is
/// not zeroed again: it never left that pool (that model's own data). Over `host`, which already
/// reads zeros after a recommit, zeroing only costs time; it matters over `vmm` (physical memory
/// another pool gave back), `device` and `external` (a buffer another pool used before).
///
/// Strong guarantee: if zeroing fails (a CUDA error), the range is decommitted again and the
/// error propagates; if that decommit fails too, the upstream keeps the range committed.
/// Options, properties, `is_elastic`, `device_ordinal()` and the capabilities (a vmm's handle
/// cache: a commit that reuses a kept handle is zeroed like any other) are `Upstream`'s.
template <class Upstream>
class zeroing : public detail::backing_adaptor<Upstream> {
    using base_type = detail::backing_adaptor<Upstream>;
    using base_type::upstream_;

    static_assert(backing<Upstream>, "vmmpp::zeroing<Upstream>: Upstream does not model vmmpp::backing");
    static_assert(has_property<Upstream, host_accessible> || has_property<Upstream, device_accessible>,
                  "vmmpp::zeroing<Upstream>: Upstream is neither host_accessible nor device_accessible, so its "
                  "memory cannot be zeroed");

public:
    using options = typename Upstream::options;
    /// True when commits are zeroed by the GPU (cudaMemsetAsync), false when by the CPU (memset).
    static constexpr bool zeroes_on_device = has_property<Upstream, device_accessible>;

    explicit zeroing(std::size_t capacity, options opts = {})
        : base_type(capacity, std::move(opts)), zeroer_(device_of(upstream_)) {}
    zeroing(const zeroing&) = delete;
    zeroing& operator=(const zeroing&) = delete;
    ~zeroing() = default;

    /// Commits through `Upstream`, then zeroes [offset, offset+bytes) before returning.
    void commit(std::size_t offset, std::size_t bytes) {
        upstream_.commit(offset, bytes);
        try {
            zeroer_.zero(upstream_.base() + offset, bytes);
        } catch (...) {
            try {
                upstream_.decommit(offset, bytes);
            } catch (...) {
                // Nothing more can be undone: the upstream keeps the range committed.
            }
            throw;
        }
    }

    void decommit(std::size_t offset, std::size_t bytes) { upstream_.decommit(offset, bytes); }


    template <class P>
        requires has_property<Upstream, P>
    friend constexpr void get_property(const zeroing&, P) noexcept {}

private:
    detail::zeroer<zeroes_on_device> zeroer_;
};

static_assert(backing<zeroing<external<host_accessible>>>, "vmmpp::zeroing must model vmmpp::backing");
static_assert(has_property<zeroing<external<host_accessible>>, host_accessible> &&
                  !has_property<zeroing<external<host_accessible>>, device_accessible> &&
                  !zeroing<external<host_accessible>>::zeroes_on_device,
              "vmmpp::zeroing must forward exactly its upstream's accessibility properties");
static_assert(backing<zeroing<external<device_accessible>>> && zeroing<external<device_accessible>>::zeroes_on_device,
              "vmmpp::zeroing over device memory must model vmmpp::backing and zero on the device");
static_assert(handle_keeping_backing<zeroing<vmm>> && context_binding_backing<zeroing<vmm>> &&
                  handle_exporting_backing<zeroing<vmm>>,
              "vmmpp::zeroing<vmm> must forward the handle cache, the thread binding and the handle export");
static_assert(!handle_keeping_backing<zeroing<external<host_accessible>>> &&
                  !context_binding_backing<zeroing<external<host_accessible>>> &&
                  !handle_exporting_backing<zeroing<external<host_accessible>>>,
              "vmmpp::zeroing must add no capability its upstream lacks");

} // namespace vmmpp
