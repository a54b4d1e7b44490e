// tests/support/queued_reads.hpp: the fake-driver tests' view of a block's bytes: the engine's
// last step (device-to-host copies queued on a stream, with the fake's GPU held: they run at
// fakecuda::run_gpu or run_stream) and how many of the bytes read differ from what a block should
// hold; and the block's bytes written and checked directly through the host-visible fake mapping.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp_test {

struct queued_reads {
    explicit queued_reads(CUstream on = nullptr) : stream(on) {}
    vmmpp::primary_context context{0};
    CUstream stream = nullptr;
    std::vector<std::vector<unsigned char>> out;

    /// Queues a copy of `bytes` at `from` into a host buffer of its own.
    void read(const std::byte* from, std::size_t bytes) {
        vmmpp::scoped_context current(context);
        out.emplace_back(bytes, 0);
        vmmpp::driver::check(vmmpp::driver::get().memcpy_async(reinterpret_cast<CUdeviceptr>(out.back().data()),
                                                                reinterpret_cast<CUdeviceptr>(from), bytes, stream),
                             "cuMemcpyAsync(test read)");
    }
    /// Queues reads of every layer's K and V piece (`piece` bytes each) of `block` of `cache`.
    template <class Cache>
    void read_block(const Cache& cache, std::int32_t block, std::size_t piece) {
        for (std::uint32_t l = 0; l < cache.geometry().layers; ++l) {
            read(cache.key(l, block), piece);
            read(cache.value(l, block), piece);
        }
    }
    /// Bytes read so far that are not `value`.
    [[nodiscard]] std::size_t differing(unsigned char value) const {
        std::size_t bad = 0;
        for (const auto& o : out) {
            for (unsigned char v : o) {
                bad += v != value;
            }
        }
        return bad;
    }
};

/// Queues on `stream` a write of `value` into every layer's K and V piece (`piece` bytes each) of
/// `block` (an engine's step writing its tokens), from host buffers that live until the end of
/// the program (the write may run long after the call).
template <class Cache>
void queue_block_write(const Cache& c, std::int32_t block, unsigned char value, std::size_t piece, CUstream stream) {
    static std::vector<std::unique_ptr<std::vector<unsigned char>>> sources;
    sources.push_back(std::make_unique<std::vector<unsigned char>>(piece, value));
    vmmpp::primary_context context{0};
    vmmpp::scoped_context current(context);
    for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
        for (const std::byte* p : {c.key(l, block), c.value(l, block)}) {
            vmmpp::driver::check(vmmpp::driver::get().memcpy_async(reinterpret_cast<CUdeviceptr>(p),
                                                                    reinterpret_cast<CUdeviceptr>(sources.back()->data()),
                                                                    piece, stream),
                                 "cuMemcpyAsync(test write)");
        }
    }
}

/// Queues on `stream` a copy of `bytes` bytes from host memory `from` (which must outlive the
/// copy: it may run long after the call) to device memory `to`.
inline void queue_copy_from_host(void* to, const void* from, std::size_t bytes, CUstream stream) {
    vmmpp::primary_context context{0};
    vmmpp::scoped_context current(context);
    vmmpp::driver::check(vmmpp::driver::get().memcpy_async(reinterpret_cast<CUdeviceptr>(to),
                                                            reinterpret_cast<CUdeviceptr>(from), bytes, stream),
                         "cuMemcpyAsync(test write)");
}

/// Fills every layer's K and V piece (`piece` bytes each) of `block` with `value`.
template <class Cache>
void fill_block_pieces(Cache& c, std::int32_t block, unsigned char value, std::size_t piece) {
    for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
        std::memset(c.key(l, block), value, piece);
        std::memset(c.value(l, block), value, piece);
    }
}
/// Bytes of `block`'s K and V pieces that differ from `value`.
template <class Cache>
std::size_t differing_bytes(const Cache& c, std::int32_t block, unsigned char value, std::size_t piece) {
    std::size_t bad = 0;
    for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
        for (const std::byte* p : {c.key(l, block), c.value(l, block)}) {
            for (std::size_t i = 0; i < piece; ++i) {
                bad += static_cast<unsigned char>(p[i]) != value;
            }
        }
    }
    return bad;
}

} // namespace vmmpp_test
