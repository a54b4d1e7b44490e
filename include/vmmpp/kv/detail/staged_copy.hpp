// vmmpp/kv/detail/staged_copy.hpp: copies between a GPU cache whose blocks are many small pieces
// (layer_major: a piece per layer's K and V, 32 KiB for Llama-3-8B's 16-token blocks) and
// page-locked host memory that holds each block in one range, at the PCIe limit. The copy
// engines pay ~0.6 us per copy, so 32 KiB pieces reach about 0.6x of PCIe's bandwidth even in
// one batch; here a kernel of vmmpp's own gathers the pieces of up to 64 blocks into a staging
// buffer in device memory (or scatters them from it) and one DMA per run of host blocks moves
// the rest. Chunks alternate between the caller's stream and a second one of its priority, each
// with its own half of the staging buffer, so one chunk's kernel runs while the other's DMA does
// (a probe on an H100: one stream 0.94x of the floor, two 0.99x; copy_blocks through this path
// measured 0.86-0.96x: docs/HOST_TIER.md).
//
// The kernel ships as PTX (kv/detail/staged_pieces_ptx.hpp, from tools/kernels/staged_pieces.cu)
// that the driver compiles once per process for the GPU at hand. A driver that cannot load it
// leaves the callers on the plain path (a copy per piece). The staging buffer is stream-ordered
// scratch from a memory pool of vmmpp's own per device (cuMemAllocFromPoolAsync, at most
// staging_bytes per call, freed on the stream after the copies), which keeps up to
// staging_pool_keeps bytes once used so that a copy does not map fresh memory each time (the
// default pool gives its memory back at every synchronisation): outside the caches' budgets.
// When the GPU has no memory to spare, the copies go piece by piece instead.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <span>
#include <vector>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/event.hpp"
#include "vmmpp/kv/detail/device_copy.hpp"
#include "vmmpp/kv/detail/staged_pieces_args.hpp"
#include "vmmpp/kv/detail/staged_pieces_ptx.hpp"

namespace vmmpp::detail {

/// Staging memory one staged copy uses at most (half a chunk of blocks per stream at a time; two
/// blocks where a block is larger than half of it): large enough that launches and waits are a
/// small share of the time, small beside a cache.
inline constexpr std::size_t staging_bytes = std::size_t{32} << 20;
/// What the staging pool keeps once used (two copies at once, one each way).
inline constexpr std::size_t staging_pool_keeps = 2 * staging_bytes;
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

/// The staging pool of device `device` (its context current), made on first use and kept for
/// the life of the process. Throws: cuda_error.
[[nodiscard]] inline CUmemoryPool staging_pool(int device) {
    constexpr int max_devices = 64;
    static std::mutex mutex;
    static std::array<CUmemoryPool, max_devices> pools{};
    if (device < 0 || device >= max_devices) {
        throw invalid_argument("staged copy: device " + std::to_string(device) + " beyond the " +
                               std::to_string(max_devices) + " this build keeps staging pools for");
    }
    std::lock_guard lock(mutex);
    if (pools[device] == nullptr) {
        const driver::api& d = driver::get();
        CUmemPoolProps props{};
        props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
        props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = device;
        CUmemoryPool pool = nullptr;
        driver::check(d.mem_pool_create(&pool, &props), "cuMemPoolCreate(staging)");
        cuuint64_t keep = staging_pool_keeps;
        driver::check(d.mem_pool_set_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep),
                      "cuMemPoolSetAttribute(staging)");
        pools[device] = pool;
    }
    return pools[device];
}

/// A second stream of `main`'s priority that starts after the work queued on `main` so far;
/// destroyed, `main` waits for everything queued on it (the driver frees the stream once that
/// work is done).
class forked_stream {
public:
    explicit forked_stream(CUstream main) : main_(main) {
        const driver::api& d = driver::get();
        int priority = 0;
        driver::check(d.stream_get_priority(main, &priority), "cuStreamGetPriority(staged copy)");
        driver::check(d.stream_create_with_priority(&stream_, CU_STREAM_NON_BLOCKING, priority),
                      "cuStreamCreateWithPriority(staged copy)");
        try {
            const stream_event forked = stream_event::create();
            forked.record(main_);
            driver::check(d.stream_wait_event(stream_, forked.get(), 0), "cuStreamWaitEvent(staged copy)");
        } catch (...) {
            (void)d.stream_destroy(stream_);
            throw;
        }
    }
    forked_stream(const forked_stream&) = delete;
    forked_stream& operator=(const forked_stream&) = delete;
    ~forked_stream() {
        try {  // only a lost context fails here, and then nothing queued runs any more
            const stream_event joined = stream_event::create();
            joined.record(stream_);
            (void)driver::get().stream_wait_event(main_, joined.get(), 0);
        } catch (...) {
        }
        (void)driver::get().stream_destroy(stream_);
    }
    [[nodiscard]] CUstream get() const noexcept { return stream_; }

private:
    CUstream main_;
    CUstream stream_ = nullptr;
};

/// Queues on `stream` (a stream of device `device`, not the legacy default stream) the copies
/// between GPU blocks `gpu[i]` (the address of the block's first piece; its `rows` pieces of
/// `width` bytes are `pitch` apart) and host blocks `host[i]` (rows x width bytes in one range of
/// page-locked memory): to the host when `to_host`, else from it. Chunks of blocks are gathered
/// into the staging buffer and copied with one DMA per run of adjacent host blocks (or copied
/// and then scattered), alternating between `stream` and a stream forked from it; when the call
/// returns, `stream` is ordered after all of it. Returns false, having queued nothing, when the
/// device has no memory for the staging buffer (the caller copies piece by piece). Throws:
/// cuda_error (the copies queued before it stay queued and `stream` waits for them; the staging
/// buffer is freed on the stream all the same).
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
    const std::size_t chunk = std::clamp<std::size_t>(staging_bytes / 2 / block_bytes, 1, staged_max_blocks);
    const std::size_t chunks = (gpu.size() + chunk - 1) / chunk;
    const std::size_t half = std::min(chunk, gpu.size()) * block_bytes;  // one stream's staging
    const std::size_t lanes = chunks > 1 ? 2 : 1;
    CUdeviceptr staging = 0;
    const CUresult allocated = d.mem_alloc_from_pool_async(&staging, lanes * half, staging_pool(device), stream);
    if (allocated == CUDA_ERROR_OUT_OF_MEMORY) {
        return false;  // a full GPU (the caches hold it): the slower path needs no memory
    }
    driver::check(allocated, "cuMemAllocFromPoolAsync(staged copy)");
    try {
        std::optional<forked_stream> second;
        if (lanes == 2) {
            second.emplace(stream);  // after the allocation: it may use the memory
        }
        for (std::size_t c = 0; c < chunks; ++c) {
            const CUstream s = c % 2 == 0 ? stream : second->get();
            const CUdeviceptr buffer = staging + (c % 2) * half;
            const std::size_t first = c * chunk;
            const std::size_t count = std::min(chunk, gpu.size() - first);
            // One DMA per run of host blocks adjacent in memory, between them and the buffer, all
            // in one batch: separate copies leave a gap between DMAs (~8 % at 2 MiB each).
            auto dma = [&] {
                std::vector<void*> to;
                std::vector<const void*> from;
                std::vector<std::size_t> bytes;
                for (std::size_t j = 0; j < count;) {
                    std::size_t end = j + 1;
                    while (end < count && host[first + end] == host[first + end - 1] + block_bytes) {
                        ++end;
                    }
                    void* at = host[first + j];
                    auto* in_buffer = reinterpret_cast<void*>(buffer + j * block_bytes);
                    to.push_back(to_host ? at : in_buffer);
                    from.push_back(to_host ? in_buffer : at);
                    bytes.push_back((end - j) * block_bytes);
                    j = end;
                }
                copy_batch_async(to, from, bytes, s, "cudaMemcpyBatchAsync(staged copy)");
            };
            staged_pieces_args args{};
            for (std::size_t j = 0; j < count; ++j) {
                args.block[j] = reinterpret_cast<std::uintptr_t>(gpu[first + j]);
            }
            args.staging = buffer;
            args.pitch = pitch;
            args.width = width;
            args.rows = static_cast<unsigned>(rows);
            args.to_staging = to_host ? 1u : 0u;
            if (!to_host) {
                dma();
            }
            void* params[] = {&args};
            driver::check(d.launch_kernel(staged_pieces_kernel(), static_cast<unsigned>(count * rows), 1, 1, 256, 1,
                                          1, 0, s, params, nullptr),
                          "cuLaunchKernel(staged copy)");
            if (to_host) {
                dma();
            }
        }
    } catch (...) {  // the second stream has joined `stream`: the free comes after all of it
        (void)d.mem_free_async(staging, stream);
        throw;
    }
    driver::check(d.mem_free_async(staging, stream), "cuMemFreeAsync(staged copy)");
    return true;
}

} // namespace vmmpp::detail
