// What an inference engine's first contact with vmmpp looks like, built by each packaging test
// against vmmpp as that test delivers it (installed, vendored, or through pkg-config): reserve
// 4 MiB of host memory, commit the first 2 MiB, write to it, give it back. On a machine with a
// CUDA device (that supports VMM) it also builds a KV cache of each GPU configuration and writes
// and reads back one block's memory, host code only: no nvcc needed, so a build against a CUDA
// toolkit without nvcc (CUDA 12.9's PyPI wheels) still exercises the driver calls on a GPU.
// Prints OK first, then the GPU configurations it ran, if any.
#include <vmmpp/backing/host.hpp>
#include <vmmpp/config.hpp>
#include <vmmpp/driver/device.hpp>
#include <vmmpp/kv/cache.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

namespace {

bool host_backing() {
    constexpr std::size_t two_mib = std::size_t{2} << 20;
    vmmpp::host h(4 << 20);
    h.commit(0, two_mib);
    std::memset(h.base(), 0x5a, two_mib);
    if (h.committed_bytes() != two_mib || h.base()[two_mib - 1] != std::byte{0x5a}) {
        std::fprintf(stderr, "FAIL: committed %zu bytes, expected %zu\n", h.committed_bytes(), two_mib);
        return false;
    }
    h.decommit(0, two_mib);
    if (h.committed_bytes() != 0) {
        std::fprintf(stderr, "FAIL: %zu bytes still committed after decommit\n", h.committed_bytes());
        return false;
    }
    return true;
}

constexpr vmmpp::kv_geometry geometry{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 256};

// A cache of `Config` on device 0: one sequence of one block, whose last key bytes are written
// and read back with cudaMemcpy, then freed.
template <class Config, class... Quota>
bool gpu_cache(const char* name, Quota&&... quota) {
    vmmpp::kv_cache<Config> cache(geometry, {}, {}, std::forward<Quota>(quota)...);
    const vmmpp::seq_id seq = cache.add_sequence();
    cache.append(seq, geometry.block_tokens);
    const std::int32_t block = cache.block_table(seq).front();
    std::byte* last = cache.key(0, block) + geometry.block_tensor_bytes() - 8;
    const std::uint64_t marker = 0x0123456789abcdefULL;
    std::uint64_t read = 0;
    const bool ok = cudaMemcpy(last, &marker, sizeof marker, cudaMemcpyHostToDevice) == cudaSuccess &&
                    cudaMemcpy(&read, last, sizeof read, cudaMemcpyDeviceToHost) == cudaSuccess && read == marker;
    cache.free(seq);
    if (!ok) {
        std::fprintf(stderr, "FAIL: %s: read back %#llx (%s)\n", name, static_cast<unsigned long long>(read),
                     cudaGetErrorString(cudaGetLastError()));
    }
    return ok;
}

bool gpu_configurations(std::string& ran) {
    vmmpp::budget budget(std::size_t{1} << 30);
    const bool ok = gpu_cache<vmmpp::static_config>("static_config") &&
                    gpu_cache<vmmpp::elastic_config>("elastic_config", budget.register_model("a", std::size_t{256} << 20)) &&
                    gpu_cache<vmmpp::elastic_mapped_ahead_config>("elastic_mapped_ahead_config",
                                                                  budget.register_model("b", std::size_t{256} << 20)) &&
                    gpu_cache<vmmpp::gh200_config>("gh200_config");
    if (ok) {
        ran = "static_config elastic_config elastic_mapped_ahead_config gh200_config";
    }
    return ok;
}

} // namespace

int main() {
    try {
        if (!host_backing()) {
            return 1;
        }
        std::string ran;
        if (vmmpp::driver::device_count() > 0 && vmmpp::is_vmm_supported(0) && !gpu_configurations(ran)) {
            return 1;
        }
        std::printf("OK\n");
        if (!ran.empty()) {
            std::printf("on GPU 0 (CUDA headers %d): %s\n", CUDART_VERSION, ran.c_str());
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "FAIL: %s\n", e.what());
        return 1;
    }
}
