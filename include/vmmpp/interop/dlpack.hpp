// vmmpp/interop/dlpack.hpp: one layer's K or V of a kv_cache as a DLPack tensor, so PyTorch
// (torch.from_dlpack), NumPy (numpy.from_dlpack), CuPy or JAX read and write the cache in place.
//
//   DLManagedTensor* k = vmmpp::to_dlpack(cache, layer, vmmpp::kv_part::key);
//   // hand `k` to a consumer (in Python: a PyCapsule named "dltensor"); it calls k->deleter(k)
//
// The tensor is kv_cache::tensor's: [max_blocks, block_tokens, kv_heads, head_dim] in every
// layout, with the layout's strides in elements (block stride = one block tensor for layer_major,
// the whole block for block_major; heads before tokens for the _hnd layouts; K and V strided
// views into the per-layer packed tensor for packed_kv; [max_blocks, block_tokens, 1, latent] and
// no V for mla), byte_offset 0 (PyTorch ignores byte_offset, so the data pointer is the tensor's
// first byte). A packed_kv layer's whole tensor: to_dlpack(cache.packed_tensor(layer), device).
//
// Lifetime: an export borrows the cache's memory. Its deleter frees only the DLPack structure
// and drops `dlpack_options::keep_alive`; it never frees KV memory. So either the cache outlives
// every tensor exported from it (no keep_alive: the default), or `keep_alive` owns the cache (the
// shared_ptr it lives in, say) and the last deleter call drops it, on whichever thread the
// consumer calls it from (Python's garbage collector, a PyTorch deleter).
//
// Contents: an elastic pool backs only the blocks that live sequences hold; the rest of the
// [max_blocks, ...] tensor is reserved address space, and touching it faults (SIGSEGV on host
// memory, an illegal-address error that ends the CUDA context on vmm memory). Index only blocks
// named by block tables and slot mappings; never run a whole-tensor operation (print, sum, clone,
// fill_, copy_ of the whole tensor) on an export. The cache's own device work (copy-on-write
// copies on kv_cache_options::stream) is not ordered with the consumer's stream: synchronise or
// share the stream.
//
// Device: device memory (vmm, device, external<device_accessible>) is kDLCUDA with its ordinal;
// managed memory (device_accessible and host_accessible, e.g. managed_prefetch) kDLCUDAManaged
// with device_id 0 as DLPack says (or kDLCUDA with the ordinal when `managed_as_cuda`: PyTorch
// refuses kDLCUDAManaged); device- and host-accessible memory on no device (pinned) kDLCUDAHost;
// host memory kDLCPU.
//
// Compiles with g++ and nvcc. The DLPack header is the vendored DLPack 1.1
// (vmmpp/interop/detail/dlpack.h) unless the translation unit included another dlpack.h first
// (the include guard is shared): then versioned tensors need DLPack >= 1.0 and float8 >= 1.1.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/interop/detail/dlpack.h"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/kv/layout.hpp"
#include "vmmpp/kv/tensor.hpp"

namespace vmmpp {

/// Name of the PyCapsule that carries a DLManagedTensor* (the legacy, unversioned protocol that
/// every DLPack consumer accepts) and, once consumed, what the consumer renames it to.
inline constexpr const char* dlpack_capsule_name = "dltensor";
inline constexpr const char* dlpack_used_capsule_name = "used_dltensor";
/// The same for a DLManagedTensorVersioned* (DLPack >= 1.0, asked for with max_version >= (1, 0)).
inline constexpr const char* dlpack_versioned_capsule_name = "dltensor_versioned";
inline constexpr const char* dlpack_used_versioned_capsule_name = "used_dltensor_versioned";

/// How an export is described and what it keeps alive.
struct dlpack_options {
    /// Held by the exported tensor until its deleter runs (e.g. the shared_ptr owning the cache).
    /// Empty: the cache must outlive every exported tensor.
    std::shared_ptr<const void> keep_alive{};
    /// Describe managed memory as kDLCUDA on its device instead of kDLCUDAManaged, for consumers
    /// that know only kDLCUDA (PyTorch). Kernels address managed memory like device memory.
    bool managed_as_cuda = false;
    /// Versioned exports only: set DLPACK_FLAG_BITMASK_READ_ONLY.
    bool read_only = false;
};

/// Deleter for a unique_ptr that owns an export the caller has not handed to a consumer yet.
struct dlpack_deleter {
    void operator()(DLManagedTensor* t) const noexcept {
        if (t != nullptr && t->deleter != nullptr) {
            t->deleter(t);
        }
    }
#if defined(DLPACK_MAJOR_VERSION) && DLPACK_MAJOR_VERSION >= 1
    void operator()(DLManagedTensorVersioned* t) const noexcept {
        if (t != nullptr && t->deleter != nullptr) {
            t->deleter(t);
        }
    }
#endif
};

/// The DLPack data type of `t`. fp8_e4m3 is OCP/NVIDIA E4M3 without infinities (e4m3fn, what
/// CUDA's __nv_fp8_e4m3 and torch.float8_e4m3fn hold); fp8_e5m2 is E5M2. Float8 codes exist from
/// DLPack 1.1 on: with an older dlpack.h they throw invalid_argument naming the type.
[[nodiscard]] inline DLDataType dlpack_dtype(dtype t) {
    auto make = [](std::uint8_t code, std::uint8_t bits) {
        DLDataType d{};
        d.code = code;
        d.bits = bits;
        d.lanes = 1;
        return d;
    };
    switch (t) {
    case dtype::f32: return make(kDLFloat, 32);
    case dtype::f16: return make(kDLFloat, 16);
    case dtype::bf16: return make(kDLBfloat, 16);
    // Two E2M1 values a byte: bytes (kDLUInt 8), which PyTorch views as float4_e2m1fn_x2 (the
    // lanes and bits of a packed DLPack float4 are not agreed on between frameworks yet).
    case dtype::fp4_e2m1x2: return make(kDLUInt, 8);
#if defined(DLPACK_MAJOR_VERSION) && (DLPACK_MAJOR_VERSION > 1 || (DLPACK_MAJOR_VERSION == 1 && DLPACK_MINOR_VERSION >= 1))
    case dtype::fp8_e4m3: return make(kDLFloat8_e4m3fn, 8);
    case dtype::fp8_e5m2: return make(kDLFloat8_e5m2, 8);
#else
    case dtype::fp8_e4m3:
        throw invalid_argument("dtype fp8_e4m3 has no DLPack type code before DLPack 1.1 (the dlpack.h included is older)");
    case dtype::fp8_e5m2:
        throw invalid_argument("dtype fp8_e5m2 has no DLPack type code before DLPack 1.1 (the dlpack.h included is older)");
#endif
    }
    throw invalid_argument("dtype " + std::to_string(static_cast<int>(t)) + " has no DLPack type code");
}

/// The DLPack device of memory from backing `B` on CUDA device `ordinal` (-1: no device).
template <backing B>
[[nodiscard]] DLDevice dlpack_device(int ordinal, bool managed_as_cuda = false) {
    constexpr bool on_device = has_property<B, device_accessible>;
    constexpr bool on_host = has_property<B, host_accessible>;
    static_assert(on_device || on_host,
                  "vmmpp::dlpack_device: the backing declares neither device_accessible nor host_accessible");
    DLDevice d{};
    d.device_id = 0;
    if constexpr (on_device && on_host) {
        if (ordinal < 0) {
            d.device_type = kDLCUDAHost;  // pinned host memory the GPU reaches
        } else if (managed_as_cuda) {
            d.device_type = kDLCUDA;
            d.device_id = ordinal;
        } else {
            d.device_type = kDLCUDAManaged;
        }
    } else if constexpr (on_device) {
        if (ordinal < 0) {
            throw invalid_argument("dlpack_device: device memory needs a CUDA device ordinal, got " +
                                   std::to_string(ordinal));
        }
        d.device_type = kDLCUDA;
        d.device_id = ordinal;
    } else {
        (void)managed_as_cuda;
        d.device_type = kDLCPU;
    }
    return d;
}

/// The DLPack device of a cache's memory.
template <class Config, class Layout>
[[nodiscard]] DLDevice dlpack_device(const kv_cache<Config, Layout>& cache, bool managed_as_cuda = false) {
    return dlpack_device<typename Config::backing_type>(cache.pool().device(), managed_as_cuda);
}

namespace detail {

/// One allocation per export: the DLPack structure, its shape and strides, and the keep-alive.
template <class Managed>
struct dlpack_export {
    Managed managed{};
    std::array<std::int64_t, 4> shape{};
    std::array<std::int64_t, 4> strides{};
    std::shared_ptr<const void> keep_alive;

    static void destroy(Managed* self) noexcept { delete static_cast<dlpack_export*>(self->manager_ctx); }

    static Managed* make(const kv_tensor& t, DLDevice device, std::shared_ptr<const void> keep_alive) {
        const DLDataType type = dlpack_dtype(t.type);  // may throw: nothing allocated yet
        auto* e = new dlpack_export;
        e->shape = t.shape;
        e->strides = t.strides;
        e->keep_alive = std::move(keep_alive);
        DLTensor& d = e->managed.dl_tensor;
        d.data = t.data;
        d.device = device;
        d.ndim = static_cast<std::int32_t>(e->shape.size());
        d.dtype = type;
        d.shape = e->shape.data();
        d.strides = e->strides.data();
        d.byte_offset = 0;
        e->managed.manager_ctx = e;
        e->managed.deleter = &destroy;
        return &e->managed;
    }
};

} // namespace detail

/// `t` as a legacy DLManagedTensor on `device`; the consumer owns the result and calls its
/// deleter, which frees the structure and drops `keep_alive`, never the memory.
[[nodiscard]] inline DLManagedTensor* to_dlpack(const kv_tensor& t, DLDevice device,
                                                std::shared_ptr<const void> keep_alive = {}) {
    return detail::dlpack_export<DLManagedTensor>::make(t, device, std::move(keep_alive));
}

/// Layer `layer`'s K or V of `cache` as a legacy DLManagedTensor (what every consumer accepts).
/// Throws invalid_argument for a layer outside the cache or a type the dlpack.h cannot name.
template <class Config, class Layout>
[[nodiscard]] DLManagedTensor* to_dlpack(const kv_cache<Config, Layout>& cache, std::uint32_t layer, kv_part part,
                                         dlpack_options options = {}) {
    return to_dlpack(cache.tensor(layer, part), dlpack_device(cache, options.managed_as_cuda),
                     std::move(options.keep_alive));
}

#if defined(DLPACK_MAJOR_VERSION) && DLPACK_MAJOR_VERSION >= 1
/// `t` as a DLManagedTensorVersioned (version of the dlpack.h included, flags: read-only if
/// asked); same ownership as to_dlpack.
[[nodiscard]] inline DLManagedTensorVersioned* to_dlpack_versioned(const kv_tensor& t, DLDevice device,
                                                                   std::shared_ptr<const void> keep_alive = {},
                                                                   bool read_only = false) {
    DLManagedTensorVersioned* m = detail::dlpack_export<DLManagedTensorVersioned>::make(t, device, std::move(keep_alive));
    m->version.major = DLPACK_MAJOR_VERSION;
    m->version.minor = DLPACK_MINOR_VERSION;
    m->flags = read_only ? static_cast<std::uint64_t>(DLPACK_FLAG_BITMASK_READ_ONLY) : 0;
    return m;
}

/// Layer `layer`'s K or V of `cache` as a DLManagedTensorVersioned, for consumers that ask for
/// DLPack >= 1.0 (a writable array in NumPy 2, where a legacy capsule reads as read-only).
template <class Config, class Layout>
[[nodiscard]] DLManagedTensorVersioned* to_dlpack_versioned(const kv_cache<Config, Layout>& cache, std::uint32_t layer,
                                                            kv_part part, dlpack_options options = {}) {
    return to_dlpack_versioned(cache.tensor(layer, part), dlpack_device(cache, options.managed_as_cuda),
                               std::move(options.keep_alive), options.read_only);
}
#endif

} // namespace vmmpp
