// vmmpp/detail/unique_fd.hpp: an owned POSIX file descriptor, closed when its owner goes. Every
// descriptor vmmpp opens or receives (shared-memory segments, /proc files, descriptors passed
// over a socket) is held in one, so that no path, error paths included, leaks or double-closes it.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <utility>

namespace vmmpp::detail {

/// Owns one file descriptor (or none: -1) and closes it on destruction, reset or move-assignment.
/// Move-only.
///
/// Thread safety: like an int; one object must not be used by two threads at once unless both
/// only read it.
class unique_fd {
public:
    /// Owns nothing.
    unique_fd() noexcept = default;
    /// Takes ownership of `fd` (-1: nothing).
    explicit unique_fd(int fd) noexcept : fd_(fd) {}
    /// Takes `other`'s descriptor; `other` owns nothing.
    unique_fd(unique_fd&& other) noexcept : fd_(other.release()) {}
    /// Closes the descriptor owned here, then takes `other`'s.
    unique_fd& operator=(unique_fd&& other) noexcept {
        if (this != &other) {
            reset(other.release());
        }
        return *this;
    }
    unique_fd(const unique_fd&) = delete;
    unique_fd& operator=(const unique_fd&) = delete;
    /// Closes the descriptor, if one is owned.
    ~unique_fd() { reset(); }

    /// The descriptor, still owned here; -1 if none.
    [[nodiscard]] int get() const noexcept { return fd_; }
    /// Whether a descriptor is owned.
    [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
    /// Whether a descriptor is owned.
    explicit operator bool() const noexcept { return valid(); }

    /// Gives up ownership without closing; returns the descriptor (-1 if none).
    [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }

    /// Closes the descriptor owned here (if any) and takes `fd` instead. Leaves errno as it was,
    /// so an error path may close descriptors between a failed call and reading its errno.
    /// (On Linux, close releases the descriptor even when it reports an error, so it is not
    /// retried.)
    void reset(int fd = -1) noexcept {
        if (const int old = std::exchange(fd_, fd); old >= 0) {
            const int saved = errno;
            ::close(old);
            errno = saved;
        }
    }

private:
    int fd_ = -1;
};

} // namespace vmmpp::detail
