// kv_cache on the GPU configurations: a kernel writes K/V through slot_mapping, another reads
// them back through the packed block tables (fork and copy-on-write included), and the result
// must equal a host reference.
#define VMMPP_GPU_TEST_NAME "gpu kv cache"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <boost/mpl/list.hpp>

#include <cstdint>
#include <map>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"

using namespace vmmpp_test;

namespace {

using gpu_kv_cases = boost::mpl::list<kv_case<vmmpp::elastic_config>, kv_case<vmmpp::elastic_config, vmmpp::block_major>,
                                      kv_case<vmmpp::static_config>, kv_case<vmmpp::gh200_config>,
                                      kv_case<vmm_chunked_config, vmmpp::block_major>>;

constexpr vmmpp::kv_geometry geom{.layers = 3, .kv_heads = 2, .head_dim = 32, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 4096};
constexpr int elems = 2 * 3 * 2 * 32;  // per token: K/V x layers x heads x dims

struct kv_view {
    std::uint16_t* tensors[2 * 3];  // layer-major order: K0, V0, K1, V1, ...
    long long block_stride;         // elements
    int heads, dim, block_tokens;
};

__host__ __device__ std::uint16_t expected_value(std::uint16_t token, int tensor, int h, int d) {
    return static_cast<std::uint16_t>(token * 7u + tensor * 131u + h * 17u + d * 3u);
}

__global__ void write_through_slots(kv_view kv, const std::int64_t* slots, const std::uint16_t* tokens, int n) {
    const int t = blockIdx.x;
    if (t >= n) {
        return;
    }
    const long long block = slots[t] / kv.block_tokens;
    const long long offset = slots[t] % kv.block_tokens;
    for (int i = threadIdx.x; i < elems; i += blockDim.x) {
        const int tensor = i / (kv.heads * kv.dim);
        const int h = (i / kv.dim) % kv.heads;
        const int d = i % kv.dim;
        kv.tensors[tensor][block * kv.block_stride + (offset * kv.heads + h) * kv.dim + d] =
            expected_value(tokens[t], tensor, h, d);
    }
}

__global__ void read_through_tables(kv_view kv, const std::int32_t* tables, int max_blocks, const int* lengths,
                                    int max_tokens, std::uint16_t* out) {
    const int row = blockIdx.y;
    const int t = blockIdx.x;
    if (t >= lengths[row]) {
        return;
    }
    const long long block = tables[row * max_blocks + t / kv.block_tokens];
    const long long offset = t % kv.block_tokens;
    for (int i = threadIdx.x; i < elems; i += blockDim.x) {
        const int tensor = i / (kv.heads * kv.dim);
        const int h = (i / kv.dim) % kv.heads;
        const int d = i % kv.dim;
        out[(static_cast<long long>(row) * max_tokens + t) * elems + i] =
            kv.tensors[tensor][block * kv.block_stride + (offset * kv.heads + h) * kv.dim + d];
    }
}

template <class T>
T* device_copy(const std::vector<T>& v) {
    T* p = nullptr;
    cuda_check(cudaMalloc(&p, v.size() * sizeof(T)));
    cuda_check(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(kernels_write_by_slot_and_read_by_block_table, Case, gpu_kv_cases) {
    kv_factory<Case> factory;
    auto cache = factory.make(geom);
    auto& c = *cache;
    kv_view kv{};
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
            const auto t = c.tensor(l, part);
            kv.tensors[2 * l + static_cast<int>(part)] = static_cast<std::uint16_t*>(t.data);
            kv.block_stride = t.strides[0];
            BOOST_TEST(t.device == 0);
        }
    }
    kv.heads = geom.kv_heads;
    kv.dim = geom.head_dim;
    kv.block_tokens = geom.block_tokens;

    std::map<vmmpp::seq_id, std::vector<std::uint16_t>> model;
    std::uint16_t next = 1;
    auto append = [&](vmmpp::seq_id s, std::size_t n) {
        const auto r = c.append(s, n);
        std::vector<std::int64_t> slots(n);
        c.slot_mapping(s, r.first, slots);
        std::vector<std::uint16_t> values(n);
        for (auto& v : values) {
            v = next++;
            model[s].push_back(v);
        }
        auto* d_slots = device_copy(slots);
        auto* d_values = device_copy(values);
        write_through_slots<<<static_cast<unsigned>(n), 128>>>(kv, d_slots, d_values, static_cast<int>(n));
        cuda_check(cudaGetLastError());
        cuda_check(cudaDeviceSynchronize());
        cuda_check(cudaFree(d_slots));
        cuda_check(cudaFree(d_values));
    };

    const auto a = c.add_sequence();
    const auto b = c.add_sequence();
    append(a, 37);
    append(b, 20);
    const auto fork = c.fork(a);
    model[fork] = model[a];
    append(fork, 3);  // a's last block is shared and partial: copied on the device first
    BOOST_TEST(c.cow_copies() == 1u);
    append(a, 2);     // a's block is its own again: no copy
    BOOST_TEST(c.cow_copies() == 1u);
    c.free(b);
    model.erase(b);
    const auto d = c.add_sequence();
    append(d, 50);
    c.truncate(d, 45);
    model[d].resize(45);

    const std::vector<vmmpp::seq_id> rows{a, fork, d};
    constexpr int max_blocks = 8, max_tokens = max_blocks * 16;
    std::int32_t* d_tables = nullptr;
    cuda_check(cudaMalloc(&d_tables, rows.size() * max_blocks * sizeof(std::int32_t)));
    c.upload_block_tables(rows, max_blocks, d_tables, nullptr);
    std::vector<int> lengths;
    for (auto s : rows) {
        lengths.push_back(static_cast<int>(c.tokens(s)));
    }
    auto* d_lengths = device_copy(lengths);
    std::uint16_t* d_out = nullptr;
    const std::size_t out_elems = rows.size() * max_tokens * elems;
    cuda_check(cudaMalloc(&d_out, out_elems * sizeof(std::uint16_t)));
    read_through_tables<<<dim3(max_tokens, static_cast<unsigned>(rows.size())), 128>>>(kv, d_tables, max_blocks,
                                                                                        d_lengths, max_tokens, d_out);
    cuda_check(cudaGetLastError());
    std::vector<std::uint16_t> out(out_elems);
    cuda_check(cudaMemcpy(out.data(), d_out, out_elems * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
    std::size_t bad = 0, checked = 0;
    for (std::size_t r = 0; r < rows.size(); ++r) {
        const auto& tokens = model[rows[r]];
        BOOST_TEST(tokens.size() == static_cast<std::size_t>(lengths[r]));
        for (std::size_t t = 0; t < tokens.size(); ++t) {
            for (int i = 0; i < elems; ++i) {
                const int tensor = i / (geom.kv_heads * geom.head_dim);
                const int h = (i / geom.head_dim) % geom.kv_heads;
                const int dd = i % geom.head_dim;
                bad += out[(r * max_tokens + t) * elems + i] != expected_value(tokens[t], tensor, h, dd);
                ++checked;
            }
        }
    }
    BOOST_TEST(bad == 0u, bad << " of " << checked << " values differ");
    cuda_check(cudaFree(d_tables));
    cuda_check(cudaFree(d_lengths));
    cuda_check(cudaFree(d_out));
}
