// vmmpp/driver/context.hpp: the device's primary context, retained for as long as a backing
// lives and made current around driver calls, so vmmpp works from any thread without changing
// the caller's current device (the same context the CUDA runtime uses).
#pragma once

#include <string>
#include <utility>

#include "vmmpp/driver/api.hpp"

namespace vmmpp {

/// The CUdevice for an ordinal; vmmpp::invalid_argument when there is no such device, and
/// vmmpp::cuda_unavailable when there is no driver at all.
[[nodiscard]] inline CUdevice cuda_device(int ordinal) {
    const int count = driver::device_count();
    if (ordinal < 0 || ordinal >= count) {
        (void)driver::get();  // no driver: say so rather than "no device 0"
        throw invalid_argument("CUDA device " + std::to_string(ordinal) + " does not exist (" +
                               std::to_string(count) + " devices)");
    }
    CUdevice dev{};
    driver::check(driver::get().device_get(&dev, ordinal), "cuDeviceGet");
    return dev;
}

/// A retained reference to a device's primary context (cuDevicePrimaryCtxRetain). Move-only.
class primary_context {
public:
    /// Retains device `ordinal`'s primary context; invalid_argument if there is no such device.
    explicit primary_context(int ordinal) : ordinal_(ordinal), device_(cuda_device(ordinal)) {
        driver::check(driver::get().primary_ctx_retain(&ctx_, device_), "cuDevicePrimaryCtxRetain");
    }
    primary_context(primary_context&& other) noexcept
        : ordinal_(other.ordinal_), device_(other.device_), ctx_(std::exchange(other.ctx_, nullptr)) {}
    primary_context& operator=(primary_context&& other) noexcept {
        if (this != &other) {
            reset();
            ordinal_ = other.ordinal_;
            device_ = other.device_;
            ctx_ = std::exchange(other.ctx_, nullptr);
        }
        return *this;
    }
    primary_context(const primary_context&) = delete;
    primary_context& operator=(const primary_context&) = delete;
    ~primary_context() { reset(); }

    [[nodiscard]] CUcontext get() const noexcept { return ctx_; }
    [[nodiscard]] CUdevice device() const noexcept { return device_; }
    [[nodiscard]] int ordinal() const noexcept { return ordinal_; }

private:
    void reset() noexcept {
        if (ctx_ != nullptr) {
            (void)driver::get().primary_ctx_release(device_);
            ctx_ = nullptr;
        }
    }

    int ordinal_ = -1;
    CUdevice device_{};
    CUcontext ctx_ = nullptr;
};

/// Makes a context current for a scope (push in the constructor, pop in the destructor).
class scoped_context {
public:
    /// Pushes `ctx` unless it is current already (as it is on a thread that uses the CUDA
    /// runtime on that device, or on a pool's mapper thread): then there is nothing to undo.
    explicit scoped_context(const primary_context& ctx) : scoped_context(ctx.get()) {}
    /// The same for any context (one a stream belongs to, cuStreamGetCtx).
    explicit scoped_context(CUcontext ctx) {
        const auto& d = driver::get();
        CUcontext current = nullptr;
        if (d.ctx_get_current(&current) == CUDA_SUCCESS && current == ctx) {
            return;
        }
        driver::check(d.ctx_push_current(ctx), "cuCtxPushCurrent");
        pushed_ = true;
    }
    scoped_context(const scoped_context&) = delete;
    scoped_context& operator=(const scoped_context&) = delete;
    ~scoped_context() {
        if (pushed_) {
            CUcontext popped = nullptr;
            (void)driver::get().ctx_pop_current(&popped);
        }
    }

private:
    bool pushed_ = false;
};

/// Makes `ctx` the calling thread's current context for good (cuCtxSetCurrent): for a thread
/// that only ever works in it, such as a pool's background mapper, so each driver call skips
/// the push and pop.
inline void bind_thread_to(const primary_context& ctx) {
    driver::check(driver::get().ctx_set_current(ctx.get()), "cuCtxSetCurrent");
}

} // namespace vmmpp
