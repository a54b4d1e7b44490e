// tests/support/fakecuda/runtime.cpp: the few CUDA runtime calls vmmpp's headers make around the
// driver (zeroing's cudaMemsetAsync on a stream of its own), served by the fake driver's streams.
//
// libcudart cannot run over the fake (it needs the real driver's private tables), so every test
// registered with vmmpp_add_fakecuda_test links this object: a function defined in the
// executable wins over libcudart's, and these forward to the driver that libcuda.so.1 is in the
// process (the fake, found first through LD_LIBRARY_PATH). Only what vmmpp calls is here.
// copy_blocks' runtime copies (cudaMemcpyAsync, cudaMemcpyBatchAsync) run in the primary context
// of device 0, made current for the call when the thread has none, as the runtime's current
// device would be; cudaMemcpyPeerAsync is not here: the fake has one device.
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace {

/// The fake driver's entry points these need, resolved once as vmmpp resolves its own.
struct driver_table {
    decltype(&::cuGetErrorName) get_error_name = nullptr;
    decltype(&::cuGetErrorString) get_error_string = nullptr;
    decltype(&::cuStreamCreate) stream_create = nullptr;
    decltype(&::cuStreamDestroy) stream_destroy = nullptr;
    decltype(&::cuStreamSynchronize) stream_synchronize = nullptr;
    decltype(&::cuMemsetD8Async) memset_d8_async = nullptr;
    decltype(&::cuMemcpyAsync) memcpy_async = nullptr;
    decltype(&::cuCtxGetCurrent) ctx_get_current = nullptr;
    decltype(&::cuCtxPushCurrent) ctx_push_current = nullptr;
    decltype(&::cuCtxPopCurrent) ctx_pop_current = nullptr;
    decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
    bool complete = false;
};

driver_table load() {
    driver_table t;
    void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    using get_proc_address_t = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
    auto get_proc = lib == nullptr ? nullptr
                                   : reinterpret_cast<get_proc_address_t>(::dlsym(lib, "cuGetProcAddress_v2"));
    if (get_proc == nullptr) {
        return t;
    }
    bool complete = true;
    auto resolve = [&](const char* symbol, auto& slot) {
        void* fn = nullptr;
        CUdriverProcAddressQueryResult status{};
        if (get_proc(symbol, &fn, CUDA_VERSION, CU_GET_PROC_ADDRESS_DEFAULT, &status) != CUDA_SUCCESS || fn == nullptr) {
            complete = false;
            return;
        }
        slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(fn);
    };
    resolve("cuGetErrorName", t.get_error_name);
    resolve("cuGetErrorString", t.get_error_string);
    resolve("cuStreamCreate", t.stream_create);
    resolve("cuStreamDestroy", t.stream_destroy);
    resolve("cuStreamSynchronize", t.stream_synchronize);
    resolve("cuMemsetD8Async", t.memset_d8_async);
    resolve("cuMemcpyAsync", t.memcpy_async);
    resolve("cuCtxGetCurrent", t.ctx_get_current);
    resolve("cuCtxPushCurrent", t.ctx_push_current);
    resolve("cuCtxPopCurrent", t.ctx_pop_current);
    resolve("cuDevicePrimaryCtxRetain", t.primary_ctx_retain);
    t.complete = complete;
    return t;
}

const driver_table& driver() {
    static const driver_table t = load();
    return t;
}

thread_local cudaError_t last_error = cudaSuccess;

/// The runtime's code for a driver result: the codes vmmpp's tests meet share their numbers.
cudaError_t from_driver(CUresult rc) {
    switch (rc) {
    case CUDA_SUCCESS: return cudaSuccess;
    case CUDA_ERROR_INVALID_VALUE: return cudaErrorInvalidValue;
    case CUDA_ERROR_OUT_OF_MEMORY: return cudaErrorMemoryAllocation;
    case CUDA_ERROR_INVALID_CONTEXT: return cudaErrorDeviceUninitialized;
    case CUDA_ERROR_INVALID_HANDLE: return cudaErrorInvalidResourceHandle;
    case CUDA_ERROR_ILLEGAL_ADDRESS: return cudaErrorIllegalAddress;
    default: return cudaErrorUnknown;
    }
}

cudaError_t result(CUresult rc) {
    const cudaError_t e = from_driver(rc);
    if (e != cudaSuccess) {
        last_error = e;
    }
    return e;
}

/// The driver result behind a runtime code, for its name and text.
CUresult to_driver(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return CUDA_SUCCESS;
    case cudaErrorInvalidValue: return CUDA_ERROR_INVALID_VALUE;
    case cudaErrorMemoryAllocation: return CUDA_ERROR_OUT_OF_MEMORY;
    case cudaErrorDeviceUninitialized: return CUDA_ERROR_INVALID_CONTEXT;
    case cudaErrorInvalidResourceHandle: return CUDA_ERROR_INVALID_HANDLE;
    case cudaErrorIllegalAddress: return CUDA_ERROR_ILLEGAL_ADDRESS;
    case cudaErrorInsufficientDriver: return CUDA_ERROR_NOT_FOUND;
    default: return CUDA_ERROR_UNKNOWN;
    }
}

/// Queues the copies to[i] <- from[i] on `stream` (cuMemcpyAsync; the fake tells device from host
/// memory by its reservations), with device 0's primary context current if the thread has none.
cudaError_t copy_async(void* const* to, const void* const* from, const size_t* bytes, size_t count, cudaStream_t stream) {
    if (!driver().complete) {
        return last_error = cudaErrorInsufficientDriver;
    }
    const driver_table& d = driver();
    CUcontext current = nullptr;
    bool pushed = false;
    if (d.ctx_get_current(&current) == CUDA_SUCCESS && current == nullptr) {
        static CUcontext primary = nullptr;  // retained once, for the process, as the runtime does
        if (primary == nullptr) {
            if (CUresult rc = d.primary_ctx_retain(&primary, 0); rc != CUDA_SUCCESS) {
                return result(rc);
            }
        }
        if (CUresult rc = d.ctx_push_current(primary); rc != CUDA_SUCCESS) {
            return result(rc);
        }
        pushed = true;
    }
    CUresult rc = CUDA_SUCCESS;
    for (size_t i = 0; i < count && rc == CUDA_SUCCESS; ++i) {
        rc = d.memcpy_async(reinterpret_cast<CUdeviceptr>(to[i]), reinterpret_cast<CUdeviceptr>(from[i]), bytes[i],
                            stream);
    }
    if (pushed) {
        CUcontext popped = nullptr;
        (void)d.ctx_pop_current(&popped);
    }
    return result(rc);
}

} // namespace

extern "C" {

cudaError_t cudaGetLastError(void) { return std::exchange(last_error, cudaSuccess); }

const char* cudaGetErrorName(cudaError_t error) {
    const char* name = nullptr;
    if (driver().complete) {
        (void)driver().get_error_name(to_driver(error), &name);
    }
    return name != nullptr ? name : "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
    const char* text = nullptr;
    if (driver().complete) {
        (void)driver().get_error_string(to_driver(error), &text);
    }
    return text != nullptr ? text : "unknown error";
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
    if (!driver().complete) {
        return last_error = cudaErrorInsufficientDriver;
    }
    return result(driver().stream_create(stream, flags));
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    if (!driver().complete) {
        return last_error = cudaErrorInsufficientDriver;
    }
    return result(driver().stream_destroy(stream));
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    if (!driver().complete) {
        return last_error = cudaErrorInsufficientDriver;
    }
    return result(driver().stream_synchronize(stream));
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream) {
    if (!driver().complete) {
        return last_error = cudaErrorInsufficientDriver;
    }
    return result(driver().memset_d8_async(reinterpret_cast<CUdeviceptr>(pointer), static_cast<unsigned char>(value),
                                           bytes, stream));
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t stream) {
    return copy_async(&dst, &src, &bytes, 1, stream);
}

#if CUDART_VERSION >= 13000
cudaError_t cudaMemcpyBatchAsync(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t count,
                                 cudaMemcpyAttributes*, size_t*, size_t, cudaStream_t stream) {
    return copy_async(dsts, srcs, sizes, count, stream);
}
#elif CUDART_VERSION >= 12080
cudaError_t cudaMemcpyBatchAsync(void** dsts, void** srcs, size_t* sizes, size_t count, cudaMemcpyAttributes*,
                                 size_t*, size_t, size_t*, cudaStream_t stream) {
    return copy_async(dsts, srcs, sizes, count, stream);
}
#endif

} // extern "C"
