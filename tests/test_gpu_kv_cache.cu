// kv_cache on the GPU configurations and every layout: a kernel writes K/V through slot_mapping
// and the tensor descriptors' strides, another reads them back through the packed block tables
// (fork and copy-on-write included; sequence_contiguous refuses fork, and a third kernel reads
// each sequence through its dense sequence_tensor, as a non-paged kernel does), and the result
// must equal a host reference.
#define VMMPP_GPU_TEST_NAME "gpu kv cache"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"

using namespace vmmpp_test;

namespace {

// elastic_config in every layout of vmmpp::kv_layouts, then the other configurations in a few.
using gpu_kv_cases = vmmpp::apply_t<vmmpp::concat_t<kv_cases_over<vmmpp::elastic_config, vmmpp::kv_layouts>, vmmpp::type_list<
    kv_case<vmmpp::static_config>, kv_case<vmmpp::static_config, vmmpp::layer_major_hnd>, kv_case<vmmpp::gh200_config>,
    kv_case<vmmpp::gh200_config, vmmpp::packed_kv>, kv_case<vmm_chunked_config, vmmpp::block_major>,
    kv_case<vmm_chunked_config, vmmpp::mla>, kv_case<vmmpp::elastic_mapped_ahead_config, vmmpp::sequence_contiguous>,
    kv_case<vmmpp::static_config, vmmpp::sequence_contiguous>, kv_case<vmmpp::gh200_config, vmmpp::sequence_contiguous>,
    kv_case<vmm_chunked_config, vmmpp::sequence_contiguous>>>, std::tuple>;

// mla caches get one head of 64 (kv_factory's fit_geometry).
constexpr vmmpp::kv_geometry geom{.layers = 3, .kv_heads = 2, .head_dim = 32, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 4096,
                                  .max_tokens_per_sequence = 128};  // sequence_contiguous: 8 blocks a slot
constexpr int max_tensors = 2 * 3;

/// Every layer's K and V (mla: the latent) as a kernel reads them: pointers and the strides of
/// the cache's tensor descriptors, the same for each tensor of a cache.
struct kv_view {
    std::uint16_t* tensors[max_tensors];  // K0, V0, K1, V1, ... (mla: L0, L1, L2)
    long long block_stride, token_stride, head_stride;  // elements (the dim stride is 1)
    int count, heads, dim, block_tokens;
    int elems;  // per token: count x heads x dim
};

__host__ __device__ long long element_index(const kv_view& kv, long long block, long long offset, int h, int d) {
    return block * kv.block_stride + offset * kv.token_stride + h * kv.head_stride + d;
}

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
    for (int i = threadIdx.x; i < kv.elems; i += blockDim.x) {
        const int tensor = i / (kv.heads * kv.dim);
        const int h = (i / kv.dim) % kv.heads;
        const int d = i % kv.dim;
        kv.tensors[tensor][element_index(kv, block, offset, h, d)] = expected_value(tokens[t], tensor, h, d);
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
    for (int i = threadIdx.x; i < kv.elems; i += blockDim.x) {
        const int tensor = i / (kv.heads * kv.dim);
        const int h = (i / kv.dim) % kv.heads;
        const int d = i % kv.dim;
        out[(static_cast<long long>(row) * max_tokens + t) * kv.elems + i] =
            kv.tensors[tensor][element_index(kv, block, offset, h, d)];
    }
}

/// Reads tokens [0, length) of one sequence through its dense [tokens, heads, dim] runs (one
/// pointer per layer and K/V, token stride heads x dim): no block table, as a non-paged kernel.
__global__ void read_dense_runs(kv_view runs, int length, std::uint16_t* out) {
    const int t = blockIdx.x;
    if (t >= length) {
        return;
    }
    for (int i = threadIdx.x; i < runs.elems; i += blockDim.x) {
        const int tensor = i / (runs.heads * runs.dim);
        const int h = (i / runs.dim) % runs.heads;
        const int d = i % runs.dim;
        out[static_cast<long long>(t) * runs.elems + i] = runs.tensors[tensor][element_index(runs, 0, t, h, d)];
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
    const vmmpp::kv_geometry& g = c.geometry();
    constexpr unsigned parts = Case::layout::parts;
    kv_view kv{};
    for (std::uint32_t l = 0; l < g.layers; ++l) {
        for (unsigned p = 0; p < parts; ++p) {
            const auto t = c.tensor(l, static_cast<vmmpp::kv_part>(p));
            kv.tensors[parts * l + p] = static_cast<std::uint16_t*>(t.data);
            kv.block_stride = t.strides[0];
            kv.token_stride = t.strides[1];
            kv.head_stride = t.strides[2];
            BOOST_TEST(t.strides[3] == 1);
            BOOST_TEST(t.shape[2] == static_cast<std::int64_t>(g.kv_heads));
            BOOST_TEST(t.shape[3] == static_cast<std::int64_t>(g.head_dim));
            BOOST_TEST(t.device == 0);
        }
    }
    kv.count = static_cast<int>(parts * g.layers);
    kv.heads = static_cast<int>(g.kv_heads);
    kv.dim = static_cast<int>(g.head_dim);
    kv.block_tokens = static_cast<int>(g.block_tokens);
    kv.elems = kv.count * kv.heads * kv.dim;
    const int elems = kv.elems;

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
    vmmpp::seq_id fork = 0;
    if constexpr (vmmpp::sequence_slot_layout<typename Case::layout>) {
        BOOST_CHECK_THROW((void)c.fork(a), vmmpp::invalid_argument);  // slots cannot share blocks
        fork = c.add_sequence();  // a copy, made by appending
        append(fork, 40);
        append(a, 2);
    } else {
        fork = c.fork(a);
        model[fork] = model[a];
        append(fork, 3);  // a's last block is shared and partial: copied on the device first
        BOOST_TEST(c.cow_copies() == 1u);
        append(a, 2);     // a's block is its own again: no copy
        BOOST_TEST(c.cow_copies() == 1u);
    }
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
    const std::size_t out_elems = rows.size() * max_tokens * static_cast<std::size_t>(elems);
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
                const int tensor = i / (kv.heads * kv.dim);
                const int h = (i / kv.dim) % kv.heads;
                const int dd = i % kv.dim;
                bad += out[(r * max_tokens + t) * elems + i] != expected_value(tokens[t], tensor, h, dd);
                ++checked;
            }
        }
    }
    BOOST_TEST(bad == 0u, bad << " of " << checked << " values differ");
    if constexpr (vmmpp::sequence_slot_layout<typename Case::layout>) {
        // The same tokens through each sequence's dense runs.
        std::size_t dense_bad = 0, dense_checked = 0;
        for (auto s : rows) {
            kv_view runs = kv;
            for (std::uint32_t l = 0; l < g.layers; ++l) {
                for (unsigned p = 0; p < parts; ++p) {
                    const auto t = c.sequence_tensor(s, l, static_cast<vmmpp::kv_part>(p));
                    BOOST_TEST(t.shape[1] == static_cast<std::int64_t>(c.tokens(s)));
                    BOOST_TEST(t.strides[1] == static_cast<std::int64_t>(g.kv_heads * g.head_dim));  // dense
                    BOOST_TEST(t.strides[2] == static_cast<std::int64_t>(g.head_dim));
                    runs.tensors[parts * l + p] = static_cast<std::uint16_t*>(t.data);
                    runs.token_stride = t.strides[1];
                    runs.head_stride = t.strides[2];
                }
            }
            const int length = static_cast<int>(c.tokens(s));
            std::uint16_t* d_run = nullptr;
            cuda_check(cudaMalloc(&d_run, static_cast<std::size_t>(length) * elems * sizeof(std::uint16_t)));
            read_dense_runs<<<static_cast<unsigned>(length), 128>>>(runs, length, d_run);
            cuda_check(cudaGetLastError());
            std::vector<std::uint16_t> run(static_cast<std::size_t>(length) * elems);
            cuda_check(cudaMemcpy(run.data(), d_run, run.size() * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
            cuda_check(cudaFree(d_run));
            const auto& tokens = model[s];
            for (std::size_t t = 0; t < tokens.size(); ++t) {
                for (int i = 0; i < elems; ++i) {
                    dense_bad += run[t * elems + i] != expected_value(tokens[t], i / (kv.heads * kv.dim),
                                                                       (i / kv.dim) % kv.heads, i % kv.dim);
                    ++dense_checked;
                }
            }
        }
        BOOST_TEST(dense_checked > 0u);
        BOOST_TEST(dense_bad == 0u, dense_bad << " of " << dense_checked << " values differ in the dense runs");
    }
    cuda_check(cudaFree(d_tables));
    cuda_check(cudaFree(d_lengths));
    cuda_check(cudaFree(d_out));
}
