// One-off probe (not part of the project): the fork -> append (queued COW) -> free(parent) scenario
// of test_gpu_stream_order, built against the headers of 007dd5d, to see it fail before the fix.
#include <cstdio>
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
__global__ void spin(long long cycles) { long long s = clock64(); while (clock64() - s < cycles) {} }
int main() {
    constexpr vmmpp::kv_geometry geom{.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                      .block_tokens = 16, .max_blocks = 128};
    cudaStream_t st; cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    int khz = 0; cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
    vmmpp::budget b(1ull << 30);
    vmmpp::kv_cache<vmmpp::elastic_config, vmmpp::block_major> c(geom, {}, {}, b.register_model("m", 1ull << 30), {.stream = st});
    auto p = c.add_sequence(); c.append(p, 20);
    for (auto blk : c.block_table(p)) cudaMemset(c.key(0, blk), 0x5a, 2u << 20);
    auto ch = c.fork(p);
    spin<<<1, 1, 0, st>>>(static_cast<long long>(khz) * 300);
    c.append(ch, 1);
    c.free(p);
    (void)c.pool().trim();
    cudaError_t rc = cudaStreamSynchronize(st);
    std::printf("headers of 007dd5d: fork -> append(child, 1) -> free(parent) -> trim: cudaStreamSynchronize = %s\n", cudaGetErrorName(rc));
    return rc == cudaSuccess ? 0 : 1;
}
