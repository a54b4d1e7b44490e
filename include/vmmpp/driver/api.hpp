// vmmpp/driver/api.hpp: the CUDA driver entry points vmmpp uses, loaded at run time.
//
// Nothing links libcuda: the table below is filled from libcuda.so.1 (dlopen, then
// cuGetProcAddress for the version these headers were built against) on first use. A program on
// a machine without a driver starts normally and gets vmmpp::cuda_unavailable when it asks for
// GPU memory, and device_count() answers 0.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <string>

#include "vmmpp/error.hpp"

// The oldest CUDA these headers compile against is 12.2 (cudaMemAdvise_v2 and
// cudaMemPrefetchAsync_v2 in backing/managed_prefetch.hpp; cuGetProcAddress_v2 below is 12.0);
// CI builds them with 12.9, 13.0 and the newest 13.x (README, Requirements).
#if !defined(CUDART_VERSION) || CUDART_VERSION < 12020
#error "vmmpp needs the CUDA 12.2 toolkit headers or newer (12.9 and 13.x are tested)"
#endif

namespace vmmpp::driver {

/// The driver functions vmmpp calls, as function pointers resolved at run time.
struct api {
    decltype(&::cuInit) init = nullptr;
    decltype(&::cuGetErrorName) get_error_name = nullptr;
    decltype(&::cuGetErrorString) get_error_string = nullptr;
    decltype(&::cuDeviceGetCount) device_get_count = nullptr;
    decltype(&::cuDeviceGet) device_get = nullptr;
    decltype(&::cuDeviceGetAttribute) device_get_attribute = nullptr;
    decltype(&::cuDeviceCanAccessPeer) device_can_access_peer = nullptr;
    decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
    decltype(&::cuDevicePrimaryCtxRelease) primary_ctx_release = nullptr;
    decltype(&::cuCtxPushCurrent) ctx_push_current = nullptr;
    decltype(&::cuCtxPopCurrent) ctx_pop_current = nullptr;
    decltype(&::cuCtxGetCurrent) ctx_get_current = nullptr;
    decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
    decltype(&::cuMemGetInfo) mem_get_info = nullptr;
    decltype(&::cuMemCreate) mem_create = nullptr;
    decltype(&::cuMemRelease) mem_release = nullptr;
    decltype(&::cuMemAddressReserve) mem_address_reserve = nullptr;
    decltype(&::cuMemAddressFree) mem_address_free = nullptr;
    decltype(&::cuMemMap) mem_map = nullptr;
    decltype(&::cuMemUnmap) mem_unmap = nullptr;
    decltype(&::cuMemSetAccess) mem_set_access = nullptr;
    decltype(&::cuMemGetAllocationGranularity) mem_get_allocation_granularity = nullptr;
    decltype(&::cuMemExportToShareableHandle) mem_export_to_shareable_handle = nullptr;
    decltype(&::cuMemImportFromShareableHandle) mem_import_from_shareable_handle = nullptr;
    // Stream order: the events that tell when queued work is done, and the cache's own copies.
    decltype(&::cuEventCreate) event_create = nullptr;
    decltype(&::cuEventDestroy) event_destroy = nullptr;
    decltype(&::cuEventRecord) event_record = nullptr;
    decltype(&::cuEventQuery) event_query = nullptr;
    decltype(&::cuEventSynchronize) event_synchronize = nullptr;
    decltype(&::cuMemcpyAsync) memcpy_async = nullptr;
    decltype(&::cuMemcpyHtoDAsync) memcpy_htod_async = nullptr;
    // A block handed out again is written only after the reads queued before its free (a stream
    // waits on their events); memory goes back when the GPU reaches a release (a host function).
    decltype(&::cuStreamWaitEvent) stream_wait_event = nullptr;
    decltype(&::cuLaunchHostFunc) launch_host_func = nullptr;
    // copy_blocks between two GPUs: the context of the caller's stream, where an event on it must
    // be recorded (an event records only on a stream of its own context).
    decltype(&::cuStreamGetCtx) stream_get_ctx = nullptr;
    // Page-locked host memory (backing/pinned_host.hpp): copies to and from it run at the PCIe
    // limit, asynchronously; pageable memory is staged through the driver's own buffers.
    decltype(&::cuMemHostRegister) mem_host_register = nullptr;
    decltype(&::cuMemHostUnregister) mem_host_unregister = nullptr;
    // Copies between small pieces of a GPU cache and page-locked memory go through a staging
    // buffer (kv/detail/staged_copy.hpp): a kernel of vmmpp's own, loaded from PTX once per
    // process (a library is valid in every context), and stream-ordered scratch memory.
    decltype(&::cuLibraryLoadData) library_load_data = nullptr;
    decltype(&::cuLibraryGetKernel) library_get_kernel = nullptr;
    decltype(&::cuLaunchKernel) launch_kernel = nullptr;
    decltype(&::cuMemPoolCreate) mem_pool_create = nullptr;
    decltype(&::cuMemPoolSetAttribute) mem_pool_set_attribute = nullptr;
    decltype(&::cuMemAllocFromPoolAsync) mem_alloc_from_pool_async = nullptr;
    decltype(&::cuMemFreeAsync) mem_free_async = nullptr;
    // ... and a second stream of the caller's priority, so that one chunk's gather overlaps the
    // previous chunk's DMA.
    decltype(&::cuStreamCreateWithPriority) stream_create_with_priority = nullptr;
    decltype(&::cuStreamGetPriority) stream_get_priority = nullptr;
    decltype(&::cuStreamDestroy) stream_destroy = nullptr;
};

namespace detail {

struct load_result {
    api table{};
    std::string failure;  // empty when the table is complete and cuInit succeeded
};

inline load_result load() {
    load_result result;
    void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        const char* why = ::dlerror();
        result.failure = std::string("cannot load libcuda.so.1: ") + (why ? why : "unknown reason");
        return result;
    }
    // The library stays loaded for the life of the process, as libcudart keeps it too.
    using get_proc_address_t = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
    auto get_proc = reinterpret_cast<get_proc_address_t>(::dlsym(lib, "cuGetProcAddress_v2"));
    if (get_proc == nullptr) {
        result.failure = "libcuda.so.1 has no cuGetProcAddress_v2: the driver is older than CUDA 12";
        return result;
    }
    // Ask for each entry point as of the older of these headers and the driver: a program built
    // with a newer toolkit (13.5) than the driver (580: 13.0) runs on it (CUDA's minor-version
    // compatibility), and every entry point vmmpp uses has kept its signature since 12.2.
    constexpr int oldest_supported = 12020;  // every driver vmmpp runs on has this version of it
    void* version_fn = nullptr;
    CUdriverProcAddressQueryResult version_status{};
    int driver_version = 0;
    if (get_proc("cuDriverGetVersion", &version_fn, oldest_supported, CU_GET_PROC_ADDRESS_DEFAULT, &version_status) !=
            CUDA_SUCCESS ||
        version_fn == nullptr ||
        reinterpret_cast<decltype(&::cuDriverGetVersion)>(version_fn)(&driver_version) != CUDA_SUCCESS) {
        result.failure = "libcuda.so.1 does not say its version (cuDriverGetVersion)";
        return result;
    }
    const int version = driver_version < CUDA_VERSION ? driver_version : CUDA_VERSION;
    auto resolve = [&](const char* symbol, auto& slot) {
        void* fn = nullptr;
        CUdriverProcAddressQueryResult status{};
        if (get_proc(symbol, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT, &status) != CUDA_SUCCESS ||
            fn == nullptr) {
            if (result.failure.empty()) {
                result.failure = std::string("the CUDA driver does not provide ") + symbol;
            }
            return;
        }
        slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(fn);
    };
    api& t = result.table;
    resolve("cuInit", t.init);
    resolve("cuGetErrorName", t.get_error_name);
    resolve("cuGetErrorString", t.get_error_string);
    resolve("cuDeviceGetCount", t.device_get_count);
    resolve("cuDeviceGet", t.device_get);
    resolve("cuDeviceGetAttribute", t.device_get_attribute);
    resolve("cuDeviceCanAccessPeer", t.device_can_access_peer);
    resolve("cuDevicePrimaryCtxRetain", t.primary_ctx_retain);
    resolve("cuDevicePrimaryCtxRelease", t.primary_ctx_release);
    resolve("cuCtxPushCurrent", t.ctx_push_current);
    resolve("cuCtxPopCurrent", t.ctx_pop_current);
    resolve("cuCtxGetCurrent", t.ctx_get_current);
    resolve("cuCtxSetCurrent", t.ctx_set_current);
    resolve("cuMemGetInfo", t.mem_get_info);
    resolve("cuMemCreate", t.mem_create);
    resolve("cuMemRelease", t.mem_release);
    resolve("cuMemAddressReserve", t.mem_address_reserve);
    resolve("cuMemAddressFree", t.mem_address_free);
    resolve("cuMemMap", t.mem_map);
    resolve("cuMemUnmap", t.mem_unmap);
    resolve("cuMemSetAccess", t.mem_set_access);
    resolve("cuMemGetAllocationGranularity", t.mem_get_allocation_granularity);
    resolve("cuMemExportToShareableHandle", t.mem_export_to_shareable_handle);
    resolve("cuMemImportFromShareableHandle", t.mem_import_from_shareable_handle);
    resolve("cuEventCreate", t.event_create);
    resolve("cuEventDestroy", t.event_destroy);
    resolve("cuEventRecord", t.event_record);
    resolve("cuEventQuery", t.event_query);
    resolve("cuEventSynchronize", t.event_synchronize);
    resolve("cuMemcpyAsync", t.memcpy_async);
    resolve("cuMemcpyHtoDAsync", t.memcpy_htod_async);
    resolve("cuStreamWaitEvent", t.stream_wait_event);
    resolve("cuLaunchHostFunc", t.launch_host_func);
    resolve("cuStreamGetCtx", t.stream_get_ctx);
    resolve("cuMemHostRegister", t.mem_host_register);
    resolve("cuMemHostUnregister", t.mem_host_unregister);
    resolve("cuLibraryLoadData", t.library_load_data);
    resolve("cuLibraryGetKernel", t.library_get_kernel);
    resolve("cuLaunchKernel", t.launch_kernel);
    resolve("cuMemPoolCreate", t.mem_pool_create);
    resolve("cuMemPoolSetAttribute", t.mem_pool_set_attribute);
    resolve("cuMemAllocFromPoolAsync", t.mem_alloc_from_pool_async);
    resolve("cuMemFreeAsync", t.mem_free_async);
    resolve("cuStreamCreateWithPriority", t.stream_create_with_priority);
    resolve("cuStreamGetPriority", t.stream_get_priority);
    resolve("cuStreamDestroy", t.stream_destroy);
    if (!result.failure.empty()) {
        return result;
    }
    if (CUresult rc = t.init(0); rc != CUDA_SUCCESS) {
        const char* name = nullptr;
        t.get_error_name(rc, &name);
        result.failure = std::string("cuInit failed: ") + (name ? name : "unknown error") + " (" +
                         std::to_string(static_cast<int>(rc)) + ")";
    }
    return result;
}

inline const load_result& loaded() {
    static const load_result result = load();  // thread-safe, once per process
    return result;
}

} // namespace detail

/// Whether a CUDA driver is loaded and initialised. Never throws.
[[nodiscard]] inline bool available() noexcept {
    try {
        return detail::loaded().failure.empty();
    } catch (...) {
        return false;
    }
}

/// The driver table; throws vmmpp::cuda_unavailable (saying why) when there is no driver.
[[nodiscard]] inline const api& get() {
    const auto& result = detail::loaded();
    if (!result.failure.empty()) {
        throw cuda_unavailable("CUDA driver unavailable: " + result.failure);
    }
    return result.table;
}

/// Throws vmmpp::cuda_error naming `call` when `rc` is not CUDA_SUCCESS.
inline void check(CUresult rc, const char* call) {
    if (rc == CUDA_SUCCESS) {
        return;
    }
    const api& d = get();
    const char* name = nullptr;
    const char* text = nullptr;
    d.get_error_name(rc, &name);
    d.get_error_string(rc, &text);
    throw cuda_error(call, static_cast<int>(rc), name ? name : "unknown", text ? text : "");
}

/// Throws vmmpp::cuda_error naming `call` when a runtime call returned an error.
inline void check(cudaError_t rc, const char* call) {
    if (rc == cudaSuccess) {
        return;
    }
    (void)::cudaGetLastError();  // clear the sticky-free error so later calls start clean
    throw cuda_error(call, static_cast<int>(rc), ::cudaGetErrorName(rc), ::cudaGetErrorString(rc));
}

/// Number of CUDA devices; 0 when there is no driver or no device. Never throws.
[[nodiscard]] inline int device_count() noexcept {
    if (!available()) {
        return 0;
    }
    int count = 0;
    if (detail::loaded().table.device_get_count(&count) != CUDA_SUCCESS) {
        return 0;
    }
    return count;
}

} // namespace vmmpp::driver
