// examples/rmm_resource: RMM on a vmmpp pool. An rmm::device_buffer allocates through RMM's
// statistics_resource_adaptor, stacked on vmmpp::pool_memory_resource (vmmpp/interop/cuda_mr.hpp)
// over an elastic_config pool: RMM counts what it hands out, the pool commits the pages under it
// and gives them back once the buffers are gone and the stream has run past their last use.
// Exits 77 (skipped) without a GPU.
#include <rmm/device_buffer.hpp>
#include <rmm/mr/statistics_resource_adaptor.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/interop/cuda_mr.hpp"

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}
void expect(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "failed: %s\n", what);
        std::exit(1);
    }
}

} // namespace

int main() {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::puts("no CUDA device: skipping");
        return 77;
    }
    constexpr std::size_t mib = std::size_t{1} << 20;
    vmmpp::budget budget(1024 * mib);
    vmmpp::elastic_pool<vmmpp::elastic_config> pool(1024 * mib, {}, {}, budget.register_model("rmm", 512 * mib));
    vmmpp::pool_memory_resource vmm_mr(pool);
    rmm::mr::statistics_resource_adaptor stats{vmm_mr};

    cudaStream_t stream = nullptr;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    {
        std::vector<rmm::device_buffer> buffers;
        for (std::size_t bytes : {std::size_t{1000}, 3 * mib + 5, 40 * mib, std::size_t{256}}) {
            buffers.emplace_back(bytes, cuda::stream_ref{stream}, stats);
            check(cudaMemsetAsync(buffers.back().data(), 0x3c, bytes, stream), "cudaMemsetAsync");
        }
        std::vector<unsigned char> back(3 * mib + 5);
        check(cudaMemcpyAsync(back.data(), buffers[1].data(), back.size(), cudaMemcpyDeviceToHost, stream),
              "cudaMemcpyAsync");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        for (unsigned char v : back) {
            expect(v == 0x3c, "a buffer holds what was written into it");
        }
        const auto bytes = stats.get_bytes_counter();
        std::printf("RMM: %lld bytes in %lld allocations; vmmpp pool: %zu bytes committed of %zu reserved\n",
                    static_cast<long long>(bytes.value), static_cast<long long>(stats.get_allocations_counter().value),
                    pool.committed_bytes(), pool.capacity());
        expect(bytes.value == static_cast<long long>(1000 + 3 * mib + 5 + 40 * mib + 256), "RMM counts every byte");
        expect(pool.committed_bytes() >= 43 * mib && pool.committed_bytes() < 512 * mib, "the pool commits what is used");
        // device_buffer frees on its stream (deallocate_async): the pages wait for it.
    }
    expect(stats.get_bytes_counter().value == 0, "RMM saw every buffer freed");
    (void)pool.synchronize();
    (void)pool.trim();
    std::printf("after the buffers: %zu bytes committed\n", pool.committed_bytes());
    expect(pool.committed_bytes() == 0, "the pool gave the memory back");
    check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    std::puts("ok");
    return 0;
}
