// Helpers for gpu tests of KV caches: a stream of the test's own, the pieces of a sequence.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "support/gpu.hpp"
#include "vmmpp/kv/cache.hpp"

namespace vmmpp_test {

/// A non-blocking stream of the test's own, destroyed at the end of the test.
class test_stream {
public:
    test_stream() { cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
    test_stream(const test_stream&) = delete;
    test_stream& operator=(const test_stream&) = delete;
    ~test_stream() { (void)cudaStreamDestroy(stream_); }
    [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }
    operator cudaStream_t() const noexcept { return stream_; }  // NOLINT: a stream where one is asked for

private:
    cudaStream_t stream_ = nullptr;
};

/// Every K and V piece of the sequence's blocks, layer by layer.
template <class Cache>
std::vector<unsigned char*> pieces_of(const Cache& c, vmmpp::seq_id s) {
    std::vector<unsigned char*> out;
    for (std::int32_t b : c.block_table(s)) {
        for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
            out.push_back(reinterpret_cast<unsigned char*>(c.key(l, b)));
            out.push_back(reinterpret_cast<unsigned char*>(c.value(l, b)));
        }
    }
    return out;
}

} // namespace vmmpp_test
