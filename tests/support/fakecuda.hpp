// The control side of the fake CUDA driver (support/fakecuda/fakecuda.cpp), for tests registered
// with vmmpp_add_fakecuda_test: plan driver failures, hold the "GPU" so stream work queues, and
// read what the driver holds (handles, mapped bytes, calls). Tests do not link the fake: these
// reach it with dlsym in the libcuda.so.1 this process loaded, which vmmpp uses too, and fail
// loudly when that library is not the fake (a real driver, or no LD_LIBRARY_PATH from ctest).
#pragma once

#include <cuda.h>
#include <dlfcn.h>
#include <link.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"

namespace vmmpp_test::fakecuda {

namespace detail {

/// The fake's control functions (see fakecuda.cpp for each).
struct control {
    void (*reset)() = nullptr;
    void (*fail)(const char*, int, int) = nullptr;
    void (*hold_gpu)(int) = nullptr;
    void (*run_gpu)() = nullptr;
    std::size_t (*queued)() = nullptr;
    int (*sticky_error)() = nullptr;
    std::size_t (*live_handles)() = nullptr;
    std::size_t (*live_handle_bytes)() = nullptr;
    std::size_t (*mapped_bytes)() = nullptr;
    std::size_t (*calls)(const char*) = nullptr;
    std::size_t (*gpu_direct_rdma_handles)() = nullptr;
    void (*run_stream)(CUstream) = nullptr;
    std::size_t (*queued_on)(CUstream) = nullptr;
    std::size_t (*registered_host_bytes)() = nullptr;
    std::size_t (*async_bytes)() = nullptr;
};

inline control load() {
    void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        const char* why = ::dlerror();
        throw std::logic_error(std::string("fakecuda: cannot load libcuda.so.1 (") + (why ? why : "?") +
                               "): run this test through ctest, which puts the fake driver on LD_LIBRARY_PATH");
    }
    std::string path = "?";
    if (link_map* map = nullptr; ::dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr) {
        path = map->l_name;
    }
    control c;
    auto resolve = [&](const char* symbol, auto& slot) {
        void* fn = ::dlsym(lib, symbol);
        if (fn == nullptr) {
            throw std::logic_error("fakecuda: the libcuda.so.1 this process loaded (" + path +
                                   ") is not vmmpp's fake driver (no " + symbol +
                                   "): run this test through ctest, which puts the fake first on LD_LIBRARY_PATH");
        }
        slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(fn);
    };
    resolve("fakecuda_reset", c.reset);
    resolve("fakecuda_fail", c.fail);
    resolve("fakecuda_hold_gpu", c.hold_gpu);
    resolve("fakecuda_run_gpu", c.run_gpu);
    resolve("fakecuda_queued", c.queued);
    resolve("fakecuda_sticky_error", c.sticky_error);
    resolve("fakecuda_live_handles", c.live_handles);
    resolve("fakecuda_live_handle_bytes", c.live_handle_bytes);
    resolve("fakecuda_mapped_bytes", c.mapped_bytes);
    resolve("fakecuda_calls", c.calls);
    resolve("fakecuda_gpu_direct_rdma_handles", c.gpu_direct_rdma_handles);
    resolve("fakecuda_run_stream", c.run_stream);
    resolve("fakecuda_queued_on", c.queued_on);
    resolve("fakecuda_registered_host_bytes", c.registered_host_bytes);
    resolve("fakecuda_async_bytes", c.async_bytes);
    return c;
}

inline const control& get() {
    static const control c = load();
    return c;
}

} // namespace detail

/// Throws (naming the library loaded) unless the process's libcuda.so.1 is the fake.
inline void require() { (void)detail::get(); }

/// Runs queued work, clears planned failures and the sticky error, lets the GPU run at once.
inline void reset() { detail::get().reset(); }
/// The `nth` next call (1: the next one) of driver function `function` ("cuMemMap", the base
/// name) returns `result` and does nothing.
inline void fail(const char* function, int nth, CUresult result) {
    detail::get().fail(function, nth, static_cast<int>(result));
}
/// While held, stream work (copies, memsets, event records, waits, host functions) queues
/// instead of running, each stream in its own queue.
inline void hold_gpu(bool hold) { detail::get().hold_gpu(hold ? 1 : 0); }
/// The GPU runs everything queued, oldest first.
inline void run_gpu() { detail::get().run_gpu(); }
/// The GPU runs the queued work of `stream` only (nullptr: the legacy default stream), as far
/// as it may without another stream's work: a fast stream next to a slow one.
inline void run_stream(CUstream stream) { detail::get().run_stream(stream); }
[[nodiscard]] inline std::size_t queued() { return detail::get().queued(); }
[[nodiscard]] inline std::size_t queued_on(CUstream stream) { return detail::get().queued_on(stream); }
/// CUDA_ERROR_ILLEGAL_ADDRESS once a copy touched unmapped memory (every call fails then).
[[nodiscard]] inline CUresult sticky_error() { return static_cast<CUresult>(detail::get().sticky_error()); }
/// Physical handles created or imported and not released, and their bytes.
[[nodiscard]] inline std::size_t live_handles() { return detail::get().live_handles(); }
[[nodiscard]] inline std::size_t live_handle_bytes() { return detail::get().live_handle_bytes(); }
/// Bytes mapped into reserved address ranges.
[[nodiscard]] inline std::size_t mapped_bytes() { return detail::get().mapped_bytes(); }
/// Calls of driver function `function` so far, failed ones included.
[[nodiscard]] inline std::size_t calls(const char* function) { return detail::get().calls(function); }
/// Bytes of host memory page-locked (cuMemHostRegister) and not unregistered.
[[nodiscard]] inline std::size_t registered_host_bytes() { return detail::get().registered_host_bytes(); }
/// Bytes of stream-ordered scratch (cuMemAllocFromPoolAsync) whose free the GPU has not reached.
[[nodiscard]] inline std::size_t async_bytes() { return detail::get().async_bytes(); }
/// Live handles created with allocFlags.gpuDirectRDMACapable.
[[nodiscard]] inline std::size_t gpu_direct_rdma_handles() { return detail::get().gpu_direct_rdma_handles(); }

/// A stream of the fake's device, created with the primary context current and destroyed with
/// it (vmmpp's driver table has no stream calls: engines bring their own streams). Non-blocking
/// by default: not ordered with the legacy default stream, as engines' streams usually are.
class stream {
public:
    explicit stream(bool non_blocking = true) {
        vmmpp::scoped_context current(context_);
        vmmpp::driver::check(entry<decltype(&::cuStreamCreate)>("cuStreamCreate")(
                                 &stream_, non_blocking ? CU_STREAM_NON_BLOCKING : CU_STREAM_DEFAULT),
                             "cuStreamCreate");
    }
    stream(const stream&) = delete;
    stream& operator=(const stream&) = delete;
    ~stream() {
        vmmpp::scoped_context current(context_);
        (void)entry<decltype(&::cuStreamDestroy)>("cuStreamDestroy")(stream_);
    }
    [[nodiscard]] CUstream get() const noexcept { return stream_; }
    operator CUstream() const noexcept { return stream_; }  // NOLINT: a stream handle where one is asked for

private:
    template <class F>
    static F entry(const char* name) {
        using get_proc_t = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);
        static void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        auto get_proc = reinterpret_cast<get_proc_t>(::dlsym(lib, "cuGetProcAddress_v2"));
        void* fn = nullptr;
        if (get_proc == nullptr || get_proc(name, &fn, CUDA_VERSION, CU_GET_PROC_ADDRESS_DEFAULT, nullptr) != CUDA_SUCCESS) {
            throw std::logic_error(std::string("fakecuda: no ") + name);
        }
        return reinterpret_cast<F>(fn);
    }
    vmmpp::primary_context context_{0};
    CUstream stream_ = nullptr;
};

/// A global fixture for a test module that needs the fake, not a real driver and not none: it
/// says so once, loudly, before any test runs.
struct the_fake_driver_is_loaded {
    the_fake_driver_is_loaded() {
        require();
        if (vmmpp::driver::device_count() != 1) {
            throw std::logic_error("fakecuda: expected the fake's one device, found " +
                                   std::to_string(vmmpp::driver::device_count()));
        }
    }
};

/// A test fixture: the fake starts and ends each test case clean (nothing planned or held), so
/// a failure planned by one case never fires in the next.
struct clean_driver {
    clean_driver() { reset(); }
    ~clean_driver() { reset(); }
    clean_driver(const clean_driver&) = delete;
    clean_driver& operator=(const clean_driver&) = delete;
};

} // namespace vmmpp_test::fakecuda
