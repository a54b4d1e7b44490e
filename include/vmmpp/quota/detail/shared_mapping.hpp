// vmmpp/quota/detail/shared_mapping.hpp: an owned MAP_SHARED mapping (Linux only).
#pragma once

#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <utility>

namespace vmmpp::detail::pb {

/// An owned shared mapping (mmap with MAP_SHARED), unmapped when its owner goes. Move-only.
/// Thread safety: like a pointer; the mapped bytes are the caller's to guard.
class shared_mapping {
public:
    /// Maps nothing.
    shared_mapping() noexcept = default;
    /// Maps `bytes` of `fd` from offset 0 with protection `prot`; maps nothing (errno set) if
    /// mmap fails.
    /// Throws: nothing.
    shared_mapping(int fd, std::size_t bytes, int prot) noexcept {
        if (void* p = ::mmap(nullptr, bytes, prot, MAP_SHARED, fd, 0); p != MAP_FAILED) {
            base_ = p;
            bytes_ = bytes;
        }
    }
    /// Takes `other`'s mapping; `other` maps nothing.
    shared_mapping(shared_mapping&& other) noexcept
        : base_(std::exchange(other.base_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
    /// Unmaps what is mapped here, then takes `other`'s mapping.
    shared_mapping& operator=(shared_mapping&& other) noexcept {
        if (this != &other) {
            reset();
            base_ = std::exchange(other.base_, nullptr);
            bytes_ = std::exchange(other.bytes_, 0);
        }
        return *this;
    }
    shared_mapping(const shared_mapping&) = delete;
    shared_mapping& operator=(const shared_mapping&) = delete;
    ~shared_mapping() { reset(); }

    /// The first mapped byte; nullptr if nothing is mapped.
    [[nodiscard]] void* get() const noexcept { return base_; }
    /// Whether something is mapped.
    explicit operator bool() const noexcept { return base_ != nullptr; }
    /// Unmaps (if anything is mapped). Leaves errno as it was.
    /// Throws: nothing.
    void reset() noexcept {
        if (base_ != nullptr) {
            const int saved = errno;
            ::munmap(base_, bytes_);
            errno = saved;
            base_ = nullptr;
            bytes_ = 0;
        }
    }

private:
    void* base_ = nullptr;
    std::size_t bytes_ = 0;
};

} // namespace vmmpp::detail::pb
