// vmmpp/driver/event.hpp: a CUDA event (cuEventCreate, timing off) owned by RAII, through the
// driver table, so stream order can be tracked on machines where only the driver is loaded.
// Events mark where queued GPU work ends: memory it may touch goes back only after it completes.
#pragma once

#include <utility>

#include "vmmpp/driver/api.hpp"

namespace vmmpp {

/// A CUDA event without timing. Move-only; destroyed with cuEventDestroy. Create, record and
/// query it with the context it belongs to current (scoped_context).
class stream_event {
public:
    stream_event() noexcept = default;
    /// cuEventCreate(CU_EVENT_DISABLE_TIMING) in the current context.
    static stream_event create() {
        stream_event e;
        driver::check(driver::get().event_create(&e.event_, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
        return e;
    }
    stream_event(stream_event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
    stream_event& operator=(stream_event&& other) noexcept {
        if (this != &other) {
            reset();
            event_ = std::exchange(other.event_, nullptr);
        }
        return *this;
    }
    stream_event(const stream_event&) = delete;
    stream_event& operator=(const stream_event&) = delete;
    ~stream_event() { reset(); }

    /// Marks the end of the work queued on `stream` so far (cuEventRecord).
    void record(CUstream stream) const { driver::check(driver::get().event_record(event_, stream), "cuEventRecord"); }
    /// Whether the work before the last record has completed; never waits. A failure of that
    /// work (a sticky context error) is thrown as cuda_error.
    [[nodiscard]] bool query() const {
        const CUresult rc = driver::get().event_query(event_);
        if (rc == CUDA_ERROR_NOT_READY) {
            return false;
        }
        driver::check(rc, "cuEventQuery");
        return true;
    }
    /// Blocks until the work before the last record has completed.
    void synchronize() const { driver::check(driver::get().event_synchronize(event_), "cuEventSynchronize"); }

    [[nodiscard]] CUevent get() const noexcept { return event_; }
    [[nodiscard]] explicit operator bool() const noexcept { return event_ != nullptr; }

private:
    void reset() noexcept {
        if (event_ != nullptr) {
            (void)driver::get().event_destroy(event_);
            event_ = nullptr;
        }
    }

    CUevent event_ = nullptr;
};

} // namespace vmmpp
