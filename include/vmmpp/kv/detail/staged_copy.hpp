// vmmpp/kv/detail/staged_copy.hpp: copies between a GPU cache whose blocks are many small pieces
// (layer_major: a piece per layer's K and V, 32 KiB for Llama-3-8B's 16-token blocks) and
// page-locked host memory that holds each block in one range, at the PCIe limit. The copy
// engines pay ~0.6 us per copy, so 32 KiB pieces reach about 0.6x of PCIe's bandwidth even in
// one batch; here a kernel of vmmpp's own gathers the pieces of up to 64 blocks into a staging
// buffer in device memory (or scatters them from it) and one DMA per run of host blocks moves
// the rest: ~0.95x (bench/bench_host_tier_gpu, docs/HOST_TIER.md).
//
// The kernel ships as PTX (kv/detail/staged_pieces_ptx.hpp, from tools/kernels/staged_pieces.cu)
// that the driver compiles once per process for the GPU at hand. A driver that cannot load it
// leaves the callers on the plain path (a copy per piece). The staging buffer is stream-ordered
// scratch (cuMemAllocAsync, at most staging_bytes per call, freed on the stream after the copies):
// outside the caches' budgets, and back in the device's pool when the copies are done; when the
// GPU has none to spare, the copies go piece by piece instead.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/kv/detail/staged_pieces_args.hpp"
#include "vmmpp/kv/detail/staged_pieces_ptx.hpp"

namespace vmmpp::detail {

/// Staging memory one staged copy uses at most (a chunk of blocks at a time): large enough that
/// the kernel's share of the time is small (~5 % at 32 MiB on an H100), small beside a cache.
inline constexpr std::size_t staging_bytes = std::size_t{32} << 20;
/// Pieces at least this large are copied as they are: one DMA of 512 KiB already runs near the
/// PCIe limit (vLLM's offloading measurements; docs/HOST_TIER.md).
inline constexpr std::size_t staged_max_piece = std::size_t{512} << 10;

/// The staged-pieces kernel, loaded on first use (cuLibraryLoadData: one library for every
/// context); nullptr if the driver could not load it. Never throws.
[[nodiscard]] inline CUfunction staged_pieces_kernel() noexcept {
    static const CUfunction kernel = []() noexcept -> CUfunction {
        try {
            const driver::api& d = driver::get();
            CUlibrary library = nullptr;  // kept for the life of the process
            CUkernel k = nullptr;
            if (d.library_load_data(&library, staged_pieces_ptx, nullptr, nullptr, 0, nullptr, nullptr, 0) !=
                    CUDA_SUCCESS ||
                d.library_get_kernel(&k, library, "vmmpp_staged_pieces") != CUDA_SUCCESS) {
                return nullptr;
            }
            return reinterpret_cast<CUfunction>(k);  // a CUkernel launches as a CUfunction (CUDA 12)
        } catch (...) {
            return nullptr;
        }
    }();
    return kernel;
}

/// Whether blocks of `rows` pieces of `width` bytes, `pitch` apart, should be staged: more than
/// one piece, small ones, 16-byte aligned (the kernel moves 16 bytes at a time), and the kernel
/// loaded. The page-locked side must hold each block in one range (the caller checks).
[[nodiscard]] inline bool worth_staging(std::size_t rows, std::size_t width, std::size_t pitch) noexcept {
    return rows > 1 && width < staged_max_piece && width % 16 == 0 && pitch % 16 == 0 &&
           staged_pieces_kernel() != nullptr;
}

/// Queues on `stream` (a stream of device `device`, not the legacy default stream) the copies
/// between GPU blocks `gpu[i]` (the address of the block's first piece; its `rows` pieces of
/// `width` bytes are `pitch` apart) and host blocks `host[i]` (rows x width bytes in one range of
/// page-locked memory): to the host when `to_host`, else from it. Chunks of blocks are gathered
/// into the staging buffer and copied with one DMA per run of adjacent host blocks (or copied
/// and then scattered), all in stream order. Returns false, having queued nothing, when the
/// device has no memory for the staging buffer (the caller copies piece by piece). Throws:
/// cuda_error (the copies queued before it stay queued; the staging buffer is freed on the
/// stream all the same).
[[nodiscard]] inline bool staged_copy(int device, cudaStream_t stream, std::size_t rows, std::size_t width,
                                      std::size_t pitch, std::span<std::byte* const> gpu,
                                      std::span<std::byte* const> host, bool to_host) {
    if (gpu.empty()) {
        return true;
    }
    const driver::api& d = driver::get();
    const primary_context context(device);
    scoped_context current(context);
    const std::size_t block_bytes = rows * width;
    const std::size_t chunk = std::clamp<std::size_t>(staging_bytes / block_bytes, 1, staged_max_blocks);
    CUdeviceptr staging = 0;
    const CUresult allocated = d.mem_alloc_async(&staging, std::min(chunk, gpu.size()) * block_bytes, stream);
    if (allocated == CUDA_ERROR_OUT_OF_MEMORY) {
        return false;  // a full GPU (the caches hold it): the slower path needs no memory
    }
    driver::check(allocated, "cuMemAllocAsync(staged copy)");
    // One DMA per run of host blocks adjacent in memory, between them and the staging buffer.
    auto dma = [&](std::size_t first, std::size_t count) {
        for (std::size_t j = 0; j < count;) {
            std::size_t end = j + 1;
            while (end < count && host[first + end] == host[first + end - 1] + block_bytes) {
                ++end;
            }
            const auto at = reinterpret_cast<CUdeviceptr>(host[first + j]);
            const CUdeviceptr in_staging = staging + j * block_bytes;
            driver::check(d.memcpy_async(to_host ? at : in_staging, to_host ? in_staging : at, (end - j) * block_bytes,
                                         stream),
                          "cuMemcpyAsync(staged copy)");
            j = end;
        }
    };
    try {
        for (std::size_t first = 0; first < gpu.size(); first += chunk) {
            const std::size_t count = std::min(chunk, gpu.size() - first);
            staged_pieces_args args{};
            for (std::size_t j = 0; j < count; ++j) {
                args.block[j] = reinterpret_cast<std::uintptr_t>(gpu[first + j]);
            }
            args.staging = staging;
            args.pitch = pitch;
            args.width = width;
            args.rows = static_cast<unsigned>(rows);
            args.to_staging = to_host ? 1u : 0u;
            if (!to_host) {
                dma(first, count);
            }
            void* params[] = {&args};
            driver::check(d.launch_kernel(staged_pieces_kernel(), static_cast<unsigned>(count * rows), 1, 1, 256, 1,
                                          1, 0, stream, params, nullptr),
                          "cuLaunchKernel(staged copy)");
            if (to_host) {
                dma(first, count);
            }
        }
    } catch (...) {
        (void)d.mem_free_async(staging, stream);
        throw;
    }
    driver::check(d.mem_free_async(staging, stream), "cuMemFreeAsync(staged copy)");
    return true;
}

} // namespace vmmpp::detail
