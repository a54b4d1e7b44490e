// Helpers for gpu tests of KV caches: the cases engine-like tests run over, a stream of the
// test's own, the pieces of a sequence.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "support/gpu.hpp"
#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/type_list.hpp"

namespace vmmpp_test {

/// The configurations and paged layouts the engine-like GPU tests (prefix cache, CUDA graphs) run
/// over: the two elastic configurations and the static one, blocks together or by layer.
using paged_engine_cases = vmmpp::apply_t<
    vmmpp::product_t<vmmpp::type_list<vmmpp::elastic_config, vmmpp::elastic_page_config, vmmpp::static_config>,
                     vmmpp::type_list<vmmpp::block_major, vmmpp::layer_major>, kv_case>,
    std::tuple>;

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
