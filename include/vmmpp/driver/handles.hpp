// vmmpp/driver/handles.hpp: RAII owners for the three things the VMM driver API hands out: a
// physical allocation (cuMemCreate), a virtual address reservation (cuMemAddressReserve) and a
// mapping of the one into the other (cuMemMap). Each is move-only and gives its resource back in
// its destructor, which never throws; so a half-done multi-page commit rolls back by unwinding.
// Where a failure to give something back matters (vmm::decommit), release() and unmap() say
// what the driver answered instead.
#pragma once

#include <fcntl.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/detail/unique_fd.hpp"
#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/device.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// A physical allocation of device memory (CUmemGenericAllocationHandle).
class physical_allocation {
public:
    physical_allocation() noexcept = default;
    /// cuMemCreate of `bytes` (a multiple of the device's granularity) on `device`, GPUDirect
    /// RDMA capable if asked.
    physical_allocation(int device, std::size_t bytes, bool gpu_direct_rdma = false) : bytes_(bytes) {
        CUmemAllocationProp prop = device_allocation_prop(device, gpu_direct_rdma);
        driver::check(driver::get().mem_create(&handle_, bytes, &prop, 0), "cuMemCreate");
        owned_ = true;
    }
    physical_allocation(physical_allocation&& other) noexcept
        : handle_(other.handle_), bytes_(other.bytes_), owned_(std::exchange(other.owned_, false)) {}
    physical_allocation& operator=(physical_allocation&& other) noexcept {
        if (this != &other) {
            reset();
            handle_ = other.handle_;
            bytes_ = other.bytes_;
            owned_ = std::exchange(other.owned_, false);
        }
        return *this;
    }
    physical_allocation(const physical_allocation&) = delete;
    physical_allocation& operator=(const physical_allocation&) = delete;
    ~physical_allocation() { reset(); }

    /// Imports a physical allocation another process exported as a POSIX file descriptor
    /// (cuMemImportFromShareableHandle). `fd` stays the caller's to close.
    [[nodiscard]] static physical_allocation import_fd(int fd, std::size_t bytes) {
        physical_allocation a;
        driver::check(driver::get().mem_import_from_shareable_handle(
                          &a.handle_, reinterpret_cast<void*>(static_cast<std::intptr_t>(fd)),
                          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                      "cuMemImportFromShareableHandle");
        a.bytes_ = bytes;
        a.owned_ = true;
        return a;
    }

    /// A new POSIX file descriptor for this allocation (cuMemExportToShareableHandle), to pass to
    /// another process over a Unix socket; owned by the result. It is close-on-exec: whether the
    /// driver sets that is not documented, and a descriptor inherited by a program that another
    /// thread fork+execs would give that program read/write access to the memory.
    [[nodiscard]] detail::unique_fd export_fd() const {
        int raw = -1;
        driver::check(driver::get().mem_export_to_shareable_handle(&raw, handle_, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                      "cuMemExportToShareableHandle");
        detail::unique_fd fd(raw);
        const int flags = ::fcntl(fd.get(), F_GETFD);
        if (flags < 0 || ::fcntl(fd.get(), F_SETFD, flags | FD_CLOEXEC) != 0) {
            throw error(std::string("cuMemExportToShareableHandle: setting FD_CLOEXEC on descriptor ") +
                        std::to_string(fd.get()) + " failed: " + std::strerror(errno));
        }
        return fd;
    }

    [[nodiscard]] CUmemGenericAllocationHandle get() const noexcept { return handle_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }
    [[nodiscard]] explicit operator bool() const noexcept { return owned_; }

    /// cuMemRelease now, returning the driver's result (CUDA_SUCCESS when empty). The object is
    /// empty afterwards either way: a handle whose release failed is given up, never retried or
    /// mapped again. The memory itself goes back once its last mapping is unmapped.
    [[nodiscard]] CUresult release() noexcept {
        if (!owned_) {
            return CUDA_SUCCESS;
        }
        owned_ = false;
        return driver::get().mem_release(handle_);
    }
    /// release(), ignoring the result (destructors, rollback).
    void reset() noexcept { (void)release(); }

private:
    CUmemGenericAllocationHandle handle_{};
    std::size_t bytes_ = 0;
    bool owned_ = false;
};

/// A reserved range of virtual addresses (cuMemAddressReserve); no physical memory behind it.
class address_reservation {
public:
    address_reservation() noexcept = default;
    address_reservation(std::size_t bytes, std::size_t alignment) : bytes_(bytes) {
        driver::check(driver::get().mem_address_reserve(&base_, bytes, alignment, 0, 0), "cuMemAddressReserve");
    }
    address_reservation(address_reservation&& other) noexcept
        : base_(std::exchange(other.base_, 0)), bytes_(std::exchange(other.bytes_, 0)) {}
    address_reservation& operator=(address_reservation&& other) noexcept {
        if (this != &other) {
            reset();
            base_ = std::exchange(other.base_, 0);
            bytes_ = std::exchange(other.bytes_, 0);
        }
        return *this;
    }
    address_reservation(const address_reservation&) = delete;
    address_reservation& operator=(const address_reservation&) = delete;
    ~address_reservation() { reset(); }

    [[nodiscard]] CUdeviceptr base() const noexcept { return base_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

    void reset() noexcept {
        if (base_ != 0) {
            (void)driver::get().mem_address_free(base_, bytes_);
            base_ = 0;
        }
    }

private:
    CUdeviceptr base_ = 0;
    std::size_t bytes_ = 0;
};

/// A physical allocation mapped at an address, with read/write access set for a list of devices.
class mapping {
public:
    mapping() noexcept = default;
    /// cuMemMap of all of `memory` at `address`, then cuMemSetAccess for every device in `access`.
    /// If setting access fails the map is undone before the error propagates.
    mapping(CUdeviceptr address, const physical_allocation& memory, std::span<const int> access)
        : bytes_(memory.bytes()) {
        const auto& d = driver::get();
        // Everything that may throw comes before cuMemMap: once the range is mapped, the only
        // way out is through this object (or the explicit unmap below).
        std::vector<CUmemAccessDesc> descs(access.size());
        for (std::size_t i = 0; i < access.size(); ++i) {
            descs[i].location.type = CU_MEM_LOCATION_TYPE_DEVICE;
            descs[i].location.id = access[i];
            descs[i].flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        }
        driver::check(d.mem_map(address, bytes_, 0, memory.get(), 0), "cuMemMap");
        if (CUresult rc = d.mem_set_access(address, bytes_, descs.data(), descs.size()); rc != CUDA_SUCCESS) {
            (void)d.mem_unmap(address, bytes_);
            driver::check(rc, "cuMemSetAccess");
        }
        address_ = address;
    }
    mapping(mapping&& other) noexcept
        : address_(std::exchange(other.address_, 0)), bytes_(std::exchange(other.bytes_, 0)) {}
    mapping& operator=(mapping&& other) noexcept {
        if (this != &other) {
            reset();
            address_ = std::exchange(other.address_, 0);
            bytes_ = std::exchange(other.bytes_, 0);
        }
        return *this;
    }
    mapping(const mapping&) = delete;
    mapping& operator=(const mapping&) = delete;
    ~mapping() { reset(); }

    [[nodiscard]] CUdeviceptr address() const noexcept { return address_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

    /// cuMemUnmap now, returning the driver's result (CUDA_SUCCESS when empty). On failure the
    /// range stays this object's, as mapped as the driver left it, and the destructor tries again.
    [[nodiscard]] CUresult unmap() noexcept {
        if (address_ == 0) {
            return CUDA_SUCCESS;
        }
        const CUresult rc = driver::get().mem_unmap(address_, bytes_);
        if (rc == CUDA_SUCCESS) {
            address_ = 0;
        }
        return rc;
    }
    /// unmap(), ignoring the result: the object is empty afterwards either way (destructors).
    void reset() noexcept {
        (void)unmap();
        address_ = 0;
    }

private:
    CUdeviceptr address_ = 0;
    std::size_t bytes_ = 0;
};

} // namespace vmmpp
