// An inference engine's own CUDA translation unit, built by each packaging test against vmmpp as
// that test delivers it (installed, vendored, FetchContent, pkg-config, Conan): it includes
// <vmmpp/vmmpp.hpp> in a .cu file, as an engine's attention kernels would, instantiates every
// named configuration, and reads KV blocks through a kv_tensor with code compiled for both the
// host and the device. The build is most of the test: nvcc must get C++20 from vmmpp::vmmpp.
//
// Run: the host_config cache for real (any machine); with a CUDA device that supports VMM, also
// an elastic_config cache whose block a kernel reads back. Prints OK.
#include <vmmpp/driver/device.hpp>
#include <vmmpp/vmmpp.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>

// Every named configuration, instantiated in full (every member of the cache and its pool) by
// nvcc's front end and the host compiler it drives.
template class vmmpp::kv_cache<vmmpp::static_config>;
template class vmmpp::kv_cache<vmmpp::elastic_config>;
template class vmmpp::kv_cache<vmmpp::elastic_mapped_ahead_config>;
template class vmmpp::kv_cache<vmmpp::elastic_page_config>;
template class vmmpp::kv_cache<vmmpp::gh200_config>;
template class vmmpp::kv_cache<vmmpp::host_config>;
template class vmmpp::kv_cache<vmmpp::host_config, vmmpp::layer_major>;

namespace {

// 2 layers, 2 KV heads of 64, fp16, 16-token blocks: a block tensor is 4 KiB.
constexpr vmmpp::kv_geometry geometry{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 1024};

// A kv_tensor as a kernel takes it: its pointer and strides as plain arguments (kv_tensor's
// std::array members are host code to nvcc without --expt-relaxed-constexpr).
struct kv_view {
    const std::uint16_t* data;
    std::int64_t block_stride, token_stride, head_stride;
};

kv_view view_of(const vmmpp::kv_tensor& t) {
    return {static_cast<const std::uint16_t*>(t.data), t.strides[0], t.strides[1], t.strides[2]};
}

// Where element [block, token, head, dim] lies: what a paged-attention kernel computes, the same
// code on the host and the device.
__host__ __device__ const std::uint16_t* element(const kv_view& v, std::int64_t block, std::int64_t token,
                                                 std::int64_t head, std::int64_t dim) {
    return v.data + block * v.block_stride + token * v.token_stride + head * v.head_stride + dim;
}

__host__ __device__ const std::uint16_t* last_element(const kv_view& v, std::int32_t block) {
    return element(v, block, geometry.block_tokens - 1, geometry.kv_heads - 1, geometry.head_dim - 1);
}

__global__ void read_last_element(kv_view v, std::int32_t block, std::uint16_t* out) { *out = *last_element(v, block); }

constexpr std::uint16_t marker = 0x3c00;  // 1.0 in fp16

template <class Cache>
std::int32_t fill_one_sequence(Cache& cache) {
    const vmmpp::seq_id seq = cache.add_sequence();
    cache.append(seq, geometry.block_tokens);  // one full block
    return cache.block_table(seq).front();
}

bool run_on_host() {
    vmmpp::kv_cache<vmmpp::host_config> cache(geometry);
    const std::int32_t block = fill_one_sequence(cache);
    const vmmpp::kv_tensor k = cache.tensor(0, vmmpp::kv_part::key);
    const kv_view v = view_of(k);
    std::memcpy(const_cast<std::uint16_t*>(last_element(v, block)), &marker, sizeof marker);
    std::uint16_t read = 0;
    std::memcpy(&read, last_element(v, block), sizeof read);
    if (read != marker || k.device != -1 || cache.pool().committed_bytes() == 0) {
        std::fprintf(stderr, "FAIL: host_config: read %#x, device %d, %zu bytes committed\n", read, k.device,
                     cache.pool().committed_bytes());
        return false;
    }
    return true;
}

bool run_on_gpu() {
    vmmpp::budget budget(std::size_t{1} << 30);
    vmmpp::kv_cache<vmmpp::elastic_config> cache(geometry, {}, {}, budget.register_model("consumer", std::size_t{1} << 30));
    const std::int32_t block = fill_one_sequence(cache);
    const kv_view v = view_of(cache.tensor(0, vmmpp::kv_part::key));
    const std::uint16_t* last = last_element(v, block);
    std::uint16_t* out = nullptr;
    std::uint16_t read = 0;
    bool ok = cudaMemcpy(const_cast<std::uint16_t*>(last), &marker, sizeof marker, cudaMemcpyHostToDevice) == cudaSuccess &&
              cudaMalloc(&out, sizeof *out) == cudaSuccess;
    if (ok) {
        read_last_element<<<1, 1>>>(v, block, out);
        ok = cudaGetLastError() == cudaSuccess && cudaMemcpy(&read, out, sizeof read, cudaMemcpyDeviceToHost) == cudaSuccess;
    }
    (void)cudaFree(out);
    if (!ok || read != marker) {
        std::fprintf(stderr, "FAIL: elastic_config: kernel read %#x (%s)\n", read, cudaGetErrorString(cudaGetLastError()));
        return false;
    }
    return true;
}

} // namespace

int main() {
    try {
        if (!run_on_host()) {
            return 1;
        }
        if (vmmpp::driver::device_count() > 0 && vmmpp::is_vmm_supported(0) && !run_on_gpu()) {
            return 1;
        }
        std::puts("OK");
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "FAIL: %s\n", e.what());
        return 1;
    }
}
