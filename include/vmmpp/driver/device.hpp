// vmmpp/driver/device.hpp: questions about a CUDA device that the backings ask before they
// reserve anything: does it exist, does it support virtual memory management, what is its
// allocation granularity, how much memory is free, can it reach a peer device's memory.
#pragma once

#include <cstddef>
#include <string>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"

namespace vmmpp {

/// An integer attribute of a device (cuDeviceGetAttribute).
[[nodiscard]] inline int device_attribute(int ordinal, CUdevice_attribute attribute) {
    int value = 0;
    driver::check(driver::get().device_get_attribute(&value, attribute, cuda_device(ordinal)),
                  "cuDeviceGetAttribute");
    return value;
}

/// Whether `device` supports cuMemCreate/cuMemMap. False, never an exception, without a driver.
[[nodiscard]] inline bool is_vmm_supported(int device) noexcept {
    try {
        return device_attribute(device, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) != 0;
    } catch (...) {
        return false;
    }
}

/// Whether kernels and copy engines on `device` can reach memory that lives on `peer`
/// (cuDeviceCanAccessPeer): what a vmm backing's `vmm_options::peer_devices` needs before
/// cuMemSetAccess can open its pages to `peer`. True when `device == peer`. Throws
/// invalid_argument for an ordinal that is not a device, cuda_unavailable without a driver.
[[nodiscard]] inline bool can_access_peer(int device, int peer) {
    const CUdevice dev = cuda_device(device);
    const CUdevice other = cuda_device(peer);
    if (device == peer) {
        return true;
    }
    int can = 0;
    driver::check(driver::get().device_can_access_peer(&can, dev, other), "cuDeviceCanAccessPeer");
    return can != 0;
}

/// Allocation properties of pinned device memory on `device`, as cuMemCreate takes them;
/// `gpu_direct_rdma` asks for memory an RDMA NIC can register (allocFlags.gpuDirectRDMACapable).
[[nodiscard]] inline CUmemAllocationProp device_allocation_prop(int device, bool gpu_direct_rdma = false) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;  // exportable later
    prop.allocFlags.gpuDirectRDMACapable = gpu_direct_rdma ? 1 : 0;
    return prop;
}

/// Whether `device` can allocate VMM memory that GPUDirect RDMA can reach
/// (CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED).
[[nodiscard]] inline bool supports_gpu_direct_rdma_with_vmm(int device) {
    return device_attribute(device, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED) != 0;
}

/// The allocation granularity (bytes) of device memory on `device`: the unit every size and
/// offset of a vmm backing must be a multiple of. `recommended` picks the driver's recommended
/// granularity instead of the minimum (both 2 MiB on Hopper GPUs).
[[nodiscard]] inline std::size_t vmm_granularity(int device, bool recommended = true) {
    (void)cuda_device(device);
    CUmemAllocationProp prop = device_allocation_prop(device);
    std::size_t granularity = 0;
    driver::check(driver::get().mem_get_allocation_granularity(
                      &granularity, &prop,
                      recommended ? CU_MEM_ALLOC_GRANULARITY_RECOMMENDED : CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                  "cuMemGetAllocationGranularity");
    return granularity;
}

/// Free and total memory of a device, in bytes.
struct device_memory_info {
    std::size_t free = 0;
    std::size_t total = 0;
};

/// Free and total memory of `device` now (cuMemGetInfo in its primary context).
[[nodiscard]] inline device_memory_info device_memory(int device) {
    primary_context ctx(device);
    scoped_context current(ctx);
    device_memory_info info;
    driver::check(driver::get().mem_get_info(&info.free, &info.total), "cuMemGetInfo");
    return info;
}

} // namespace vmmpp
