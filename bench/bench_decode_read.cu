// bench/bench_decode_read.cu: the memory access of paged attention's decode step, a split-KV
// read of every K and V element of a batch's blocks through block tables, over a real kv_cache
// of each GPU configuration and layout, against the same kernel over one plain cudaMalloc in
// layer_major order with contiguous block ids (the copy floor of reading) in the same run.
//
// Why (issue "Prefix caching on elastic memory"): static_config with the default block_major
// layout read 2.54 TB/s in such a read on an H100, against 3.0 TB/s in layer_major, while
// elastic_config read 3.0 TB/s in both. Besides the configuration x layout grid, the variants
// below each test one explanation (bench/results/decode-read-PREDICTION.md lists them):
//   tables      engine (as an engine leaves them: interleaved appends, frees, re-admissions)
//               or sorted (the same live blocks, ids ascending, dealt to the sequences in order):
//               the same bytes, only the order of the reads differs;
//   mode        per_layer (one launch per layer, layers in turn, as a model runs) or all_layers
//               (one launch, consecutive CTAs in different layers: every layer's pieces at once);
//   raw/...     the kernel over memory arranged by hand with the same tables: block_major with a
//               padded block stride (+256 B, +4 KiB, +64 KiB: is it the power-of-two 2 MiB
//               stride?), with the buffer start moved (+4 KiB, +1 MiB: alignment), in groups of 8
//               or 2 layers (block stride 512 / 128 KiB: fewer 2 MiB pages per layer, the TLB),
//               and block_major on VMM memory (2 MiB handles, or adaptive extents) against the
//               same on cudaMalloc (the kind of allocation).
//
// Geometry as Llama-3-8B: 32 layers, 8 KV heads of 128, bf16, 16-token blocks; a block's K (or
// V) of one layer is one 32 KiB piece, a block of every layer 2 MiB. 64 sequences of 1792-2304
// tokens, about 16 GiB of KV live. Each CTA reads one chunk of 8 blocks of one sequence (split
// KV), 16-byte loads, and writes one 64-bit sum. Time: CUDA events around the 32 launches (or
// the one), manual time; GBps = bytes of K and V read / kernel time. Every run's first launch is
// checked: each CTA's sum against the sum computed on the host from the fill pattern (every
// subject's memory is filled by a kernel with a closed-form pattern of (layer, part, block id),
// its addressing checked against kv_cache::address for every live piece); check/small/* checks
// the kernel independently on small caches filled piece by piece through kv_cache::address with
// random bytes. A wrong sum fails the benchmark (SkipWithError).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "vmmpp/kv/block_allocator.hpp"
#include "vmmpp/kv/cache.hpp"

namespace {

using namespace vmmpp_bench;
using vmmpp::driver::check;

// ---------------------------------------------------------------------------------------------
// Geometry and kernel shape

constexpr std::uint32_t n_layers = 32;
constexpr std::uint32_t kv_heads = 8;
constexpr std::uint32_t head_dim = 128;
constexpr std::uint32_t block_tokens = 16;
constexpr std::size_t piece_bytes = std::size_t{block_tokens} * kv_heads * head_dim * 2;  // bf16: 32 KiB
constexpr std::size_t piece_words = piece_bytes / 4;
constexpr unsigned threads = 128;
constexpr unsigned vec_per_thread = static_cast<unsigned>(piece_bytes / 16 / threads);  // 16
constexpr int chunk_blocks = 8;  // blocks per CTA (split KV: 128 tokens per split)
static_assert(piece_bytes % (16 * threads) == 0);

vmmpp::kv_geometry make_geometry(std::uint32_t layers, std::uint32_t max_blocks) {
    vmmpp::kv_geometry g;
    g.layers = layers;
    g.kv_heads = kv_heads;
    g.head_dim = head_dim;
    g.type = vmmpp::dtype::bf16;
    g.block_tokens = block_tokens;
    g.max_blocks = max_blocks;
    return g;
}

/// Where layer l's K (part 0) or V (part 1) of block b lies:
///   base + (l / group) * group_stride + b * block_stride + (l % group) * layer_stride + p * part_stride.
/// block_major: group = layers; layer_major: group = 1, group_stride = two regions, part_stride
/// = one region; layer groups in between.
struct addressing {
    std::byte* base = nullptr;
    std::uint32_t group = 1;
    std::size_t group_stride = 0, block_stride = 0, layer_stride = 0, part_stride = 0;

    __host__ __device__ std::byte* at(std::uint32_t l, std::uint32_t p, std::int32_t b) const {
        return base + std::size_t{l / group} * group_stride + static_cast<std::size_t>(b) * block_stride +
               std::size_t{l % group} * layer_stride + std::size_t{p} * part_stride;
    }
};

/// The 32-bit words of a filled piece: word w of (layer, part, block) is h(layer, part, block) + w,
/// h below 2^31 so no word wraps: a piece sums to piece_words * h + piece_words * (piece_words - 1) / 2.
__host__ __device__ inline std::uint32_t piece_seed(std::uint32_t l, std::uint32_t p, std::int32_t b) {
    std::uint32_t x = (l * 2 + p) * 0x9E3779B9u ^ (static_cast<std::uint32_t>(b) * 0x85EBCA6Bu + 0x165667B1u);
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    return x & 0x7FFFFFFFu;
}
std::uint64_t piece_sum(std::uint32_t l, std::uint32_t p, std::int32_t b) {
    return std::uint64_t{piece_words} * piece_seed(l, p, b) + std::uint64_t{piece_words} * (piece_words - 1) / 2;
}

/// The tables a launch reads: a [batch, stride] int32 table and each sequence's block count.
struct launch_tables {
    const std::int32_t* table = nullptr;
    const std::int32_t* blocks = nullptr;
    int stride = 0;
};

__device__ inline std::uint64_t sum_words(uint4 v) {
    return std::uint64_t{v.x} + std::uint64_t{v.y} + std::uint64_t{v.z} + std::uint64_t{v.w};
}

/// CTA (x, seq): layer = layer0 + x % layers_here, split = x / layers_here; reads every K and V
/// element of the split's blocks of that layer, writes their sum to out[layer][seq][split].
__global__ void __launch_bounds__(threads, 8)
    decode_read(addressing a, launch_tables t, int splits, std::uint32_t layer0, std::uint32_t layers_here,
                std::uint64_t* __restrict__ out) {
    const std::uint32_t layer = layer0 + blockIdx.x % layers_here;
    const int split = static_cast<int>(blockIdx.x / layers_here);
    const int seq = static_cast<int>(blockIdx.y);
    const int n = t.blocks[seq];
    const int first = split * chunk_blocks;
    const int last = min(n, first + chunk_blocks);
    std::uint64_t acc = 0;
    for (int i = first; i < last; ++i) {
        const std::int32_t id = t.table[seq * t.stride + i];
        const uint4* k = reinterpret_cast<const uint4*>(a.at(layer, 0, id));
        const uint4* v = reinterpret_cast<const uint4*>(a.at(layer, 1, id));
        uint4 kr[vec_per_thread];
        uint4 vr[vec_per_thread];
#pragma unroll
        for (unsigned j = 0; j < vec_per_thread; ++j) {
            kr[j] = k[j * threads + threadIdx.x];
        }
#pragma unroll
        for (unsigned j = 0; j < vec_per_thread; ++j) {
            vr[j] = v[j * threads + threadIdx.x];
        }
#pragma unroll
        for (unsigned j = 0; j < vec_per_thread; ++j) {
            acc += sum_words(kr[j]) + sum_words(vr[j]);
        }
    }
    for (int off = 16; off > 0; off /= 2) {
        acc += __shfl_down_sync(0xFFFFFFFFu, acc, off);
    }
    __shared__ std::uint64_t warp_sums[threads / 32];
    if (threadIdx.x % 32 == 0) {
        warp_sums[threadIdx.x / 32] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        std::uint64_t s = 0;
        for (unsigned w = 0; w < threads / 32; ++w) {
            s += warp_sums[w];
        }
        out[(std::size_t{layer} * gridDim.y + seq) * static_cast<std::size_t>(splits) + split] = s;
    }
}

/// Writes the pattern of piece_seed into every K and V piece of every layer of the tables' blocks.
__global__ void fill_pieces(addressing a, launch_tables t, int splits, std::uint32_t layers) {
    const std::uint32_t layer = blockIdx.x % layers;
    const int split = static_cast<int>(blockIdx.x / layers);
    const int seq = static_cast<int>(blockIdx.y);
    const int n = t.blocks[seq];
    for (int i = split * chunk_blocks; i < min(n, (split + 1) * chunk_blocks); ++i) {
        const std::int32_t id = t.table[seq * t.stride + i];
        for (std::uint32_t p = 0; p < 2; ++p) {
            const std::uint32_t h = piece_seed(layer, p, id);
            uint4* dst = reinterpret_cast<uint4*>(a.at(layer, p, id));
            for (unsigned j = threadIdx.x; j < piece_bytes / 16; j += blockDim.x) {
                const std::uint32_t w = j * 4;
                dst[j] = make_uint4(h + w, h + w + 1, h + w + 2, h + w + 3);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Block tables: an engine's trace

using tables_t = std::vector<std::vector<std::int32_t>>;  // per sequence, its block ids in order

/// One step of an engine's life: a sequence admitted, tokens appended, a sequence freed.
struct trace_op {
    enum kind_t { add, append, free } kind;
    int seq;  // logical sequence
    std::size_t tokens;
};

struct trace {
    std::vector<trace_op> ops;
    std::vector<int> finals;  // the logical sequences live at the end, in batch order
    std::uint32_t max_blocks = 0;  // the cache's capacity: the highest id handed out + 1, rounded to 64
    tables_t tables;  // of `finals`, as block_allocator (lowest free id first) hands ids out
};

/// A seeded engine: 64 sequences of 1792-2304 tokens admitted one per step with a prompt of
/// 128-1024 tokens, then grown 16 tokens per step in a shuffled order; beside them up to 16
/// short-lived requests (prompts of 64-512 tokens, 8-64 steps); every 37 steps a growing
/// sequence is preempted (freed) and re-admitted 5 steps later with its tokens as the prompt
/// (recompute). At the end the short-lived requests are freed: the 64 remain, their tables
/// scattered over the ids, with holes between.
trace make_trace(std::uint32_t seed, int batch = 64) {
    constexpr int transient_cap = 16;
    std::mt19937 rng(seed);
    auto uniform = [&](std::size_t lo, std::size_t hi) { return std::uniform_int_distribution<std::size_t>(lo, hi)(rng); };
    trace tr;
    struct seq_state {
        std::size_t tokens = 0, target = 0, prompt = 0;
        int ends_at = -1;  // transient: the step it finishes
        int readmit_at = -1;  // preempted: the step it comes back
        bool live = false, final = false;
    };
    std::vector<seq_state> seqs;
    for (int s = 0; s < batch; ++s) {
        seq_state st;
        st.final = true;
        st.target = uniform(1792, 2304);
        st.prompt = uniform(128, 1024);
        seqs.push_back(st);
        tr.finals.push_back(s);
    }
    // Reference ids, as kv_cache's block_allocator hands them out.
    vmmpp::block_allocator ids(1u << 20);
    std::map<int, std::vector<std::int32_t>> held;
    std::uint32_t highest = 0;
    auto do_add = [&](int s, std::size_t prompt) {
        tr.ops.push_back({trace_op::add, s, 0});
        seqs[static_cast<std::size_t>(s)].live = true;
        seqs[static_cast<std::size_t>(s)].tokens = 0;
        held[s].clear();
        tr.ops.push_back({trace_op::append, s, prompt});
        seqs[static_cast<std::size_t>(s)].tokens = prompt;
        while (held[s].size() * block_tokens < prompt) {
            held[s].push_back(ids.allocate());
            highest = std::max(highest, static_cast<std::uint32_t>(held[s].back()));
        }
    };
    auto do_append = [&](int s, std::size_t n) {
        auto& st = seqs[static_cast<std::size_t>(s)];
        tr.ops.push_back({trace_op::append, s, n});
        st.tokens += n;
        while (held[s].size() * block_tokens < st.tokens) {
            held[s].push_back(ids.allocate());
            highest = std::max(highest, static_cast<std::uint32_t>(held[s].back()));
        }
    };
    auto do_free = [&](int s) {
        tr.ops.push_back({trace_op::free, s, 0});
        seqs[static_cast<std::size_t>(s)].live = false;
        for (auto id : held[s]) {
            (void)ids.release(id);
        }
        held[s].clear();
    };
    int admitted = 0;
    for (int step = 0;; ++step) {
        // Admissions: one final per step, re-admissions, transients up to the cap.
        if (admitted < batch) {
            do_add(admitted, seqs[static_cast<std::size_t>(admitted)].prompt);
            ++admitted;
        }
        for (int s = 0; s < batch; ++s) {
            auto& st = seqs[static_cast<std::size_t>(s)];
            if (st.readmit_at == step) {
                st.readmit_at = -1;
                do_add(s, st.prompt);
            }
        }
        int transients = 0;
        for (const auto& st : seqs) {
            transients += (!st.final && st.live) ? 1 : 0;
        }
        if (transients < transient_cap && step < 400) {
            seq_state st;
            st.ends_at = step + static_cast<int>(uniform(8, 64));
            seqs.push_back(st);
            do_add(static_cast<int>(seqs.size()) - 1, uniform(64, 512));
        }
        // Preemption of a growing final.
        if (step % 37 == 36) {
            std::vector<int> growing;
            for (int s = 0; s < batch; ++s) {
                const auto& st = seqs[static_cast<std::size_t>(s)];
                if (st.live && st.tokens < st.target) {
                    growing.push_back(s);
                }
            }
            if (!growing.empty()) {
                const int s = growing[uniform(0, growing.size() - 1)];
                auto& st = seqs[static_cast<std::size_t>(s)];
                st.prompt = st.tokens;  // recomputed on re-admission
                st.readmit_at = step + 5;
                do_free(s);
            }
        }
        // One decode step of 16 tokens for every live sequence, in a shuffled order.
        std::vector<int> order;
        for (int s = 0; s < static_cast<int>(seqs.size()); ++s) {
            const auto& st = seqs[static_cast<std::size_t>(s)];
            if (st.live && (!st.final || st.tokens < st.target)) {
                order.push_back(s);
            }
        }
        std::shuffle(order.begin(), order.end(), rng);
        for (int s : order) {
            auto& st = seqs[static_cast<std::size_t>(s)];
            const std::size_t n = st.final ? std::min<std::size_t>(16, st.target - st.tokens) : 16;
            do_append(s, n);
        }
        for (int s = batch; s < static_cast<int>(seqs.size()); ++s) {
            if (seqs[static_cast<std::size_t>(s)].live && seqs[static_cast<std::size_t>(s)].ends_at == step) {
                do_free(s);
            }
        }
        bool done = admitted == batch;
        for (int s = 0; s < batch && done; ++s) {
            const auto& st = seqs[static_cast<std::size_t>(s)];
            done = st.live && st.tokens >= st.target;
        }
        if (done) {
            break;
        }
    }
    for (int s = batch; s < static_cast<int>(seqs.size()); ++s) {
        if (seqs[static_cast<std::size_t>(s)].live) {
            do_free(s);
        }
    }
    tr.max_blocks = (highest + 1 + 63) / 64 * 64;
    for (int s : tr.finals) {
        tr.tables.push_back(held[s]);
    }
    return tr;
}

const trace& the_trace() {
    static const trace tr = make_trace(20261207);
    return tr;
}

std::size_t total_blocks(const tables_t& t) {
    std::size_t n = 0;
    for (const auto& s : t) {
        n += s.size();
    }
    return n;
}

/// The same blocks as `t`, ids ascending, dealt to the sequences in order with their lengths.
tables_t sorted_tables(const tables_t& t) {
    std::vector<std::int32_t> all;
    for (const auto& s : t) {
        all.insert(all.end(), s.begin(), s.end());
    }
    std::sort(all.begin(), all.end());
    tables_t out;
    std::size_t next = 0;
    for (const auto& s : t) {
        out.emplace_back(all.begin() + static_cast<std::ptrdiff_t>(next),
                         all.begin() + static_cast<std::ptrdiff_t>(next + s.size()));
        next += s.size();
    }
    return out;
}

/// Ids 0, 1, 2, ... dealt to sequences of the lengths of `t`.
tables_t contiguous_tables(const tables_t& t) {
    tables_t out;
    std::int32_t next = 0;
    for (const auto& s : t) {
        std::vector<std::int32_t> ids(s.size());
        for (auto& id : ids) {
            id = next++;
        }
        out.push_back(std::move(ids));
    }
    return out;
}

std::int32_t max_id(const tables_t& t) {
    std::int32_t m = 0;
    for (const auto& s : t) {
        for (auto id : s) {
            m = std::max(m, id);
        }
    }
    return m;
}

// ---------------------------------------------------------------------------------------------
// Device side of a run: tables on the device, the output, events

template <class T>
struct device_array {
    T* p = nullptr;
    std::size_t n = 0;
    explicit device_array(std::size_t count) : n(count) {
        void* v = nullptr;
        check(::cudaMalloc(&v, std::max<std::size_t>(1, count) * sizeof(T)), "cudaMalloc");
        p = static_cast<T*>(v);
    }
    device_array(const device_array&) = delete;
    device_array& operator=(const device_array&) = delete;
    ~device_array() { (void)::cudaFree(p); }
};

/// Tables uploaded, the per-CTA output, and the launches.
class reader {
public:
    reader(const tables_t& t, std::uint32_t layers)
        : tables_(t), layers_(layers), batch_(static_cast<int>(t.size())) {
        int longest = 0;
        for (const auto& s : t) {
            longest = std::max(longest, static_cast<int>(s.size()));
        }
        stride_ = longest;
        splits_ = (longest + chunk_blocks - 1) / chunk_blocks;
        std::vector<std::int32_t> flat(static_cast<std::size_t>(batch_) * static_cast<std::size_t>(stride_), 0);
        std::vector<std::int32_t> counts;
        for (int s = 0; s < batch_; ++s) {
            const auto& seq = t[static_cast<std::size_t>(s)];
            std::copy(seq.begin(), seq.end(), flat.begin() + static_cast<std::ptrdiff_t>(s) * stride_);
            counts.push_back(static_cast<std::int32_t>(seq.size()));
        }
        table_ = std::make_unique<device_array<std::int32_t>>(flat.size());
        counts_ = std::make_unique<device_array<std::int32_t>>(counts.size());
        out_ = std::make_unique<device_array<std::uint64_t>>(out_count());
        check(::cudaMemcpy(table_->p, flat.data(), flat.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice),
              "cudaMemcpy");
        check(::cudaMemcpy(counts_->p, counts.data(), counts.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice),
              "cudaMemcpy");
        check(::cudaEventCreate(&start_), "cudaEventCreate");
        check(::cudaEventCreate(&stop_), "cudaEventCreate");
    }
    reader(const reader&) = delete;
    reader& operator=(const reader&) = delete;
    ~reader() {
        (void)::cudaEventDestroy(start_);
        (void)::cudaEventDestroy(stop_);
    }

    [[nodiscard]] std::size_t out_count() const {
        return std::size_t{layers_} * static_cast<std::size_t>(batch_) * static_cast<std::size_t>(splits_);
    }
    [[nodiscard]] double bytes() const { return static_cast<double>(total_blocks(tables_) * 2 * piece_bytes * layers_); }

    /// Fills every piece of the tables' blocks with the pattern (all layers).
    void fill(const addressing& a) {
        fill_pieces<<<dim3(static_cast<unsigned>(splits_) * layers_, static_cast<unsigned>(batch_)), 256>>>(
            a, tabs(), splits_, layers_);
        check(::cudaGetLastError(), "fill_pieces launch");
        check(::cudaDeviceSynchronize(), "fill_pieces");
    }

    /// One decode read of every layer: 32 launches (per_layer) or one (all_layers). Seconds.
    double read(const addressing& a, bool all_layers) {
        check(::cudaEventRecord(start_), "cudaEventRecord");
        if (all_layers) {
            decode_read<<<dim3(static_cast<unsigned>(splits_) * layers_, static_cast<unsigned>(batch_)), threads>>>(
                a, tabs(), splits_, 0, layers_, out_->p);
        } else {
            for (std::uint32_t l = 0; l < layers_; ++l) {
                decode_read<<<dim3(static_cast<unsigned>(splits_), static_cast<unsigned>(batch_)), threads>>>(
                    a, tabs(), splits_, l, 1, out_->p);
            }
        }
        check(::cudaGetLastError(), "decode_read launch");
        check(::cudaEventRecord(stop_), "cudaEventRecord");
        check(::cudaEventSynchronize(stop_), "cudaEventSynchronize");
        float ms = 0;
        check(::cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
        return ms * 1e-3;
    }

    /// The per-CTA sums of the last read.
    [[nodiscard]] std::vector<std::uint64_t> sums() const {
        std::vector<std::uint64_t> h(out_count());
        check(::cudaMemcpy(h.data(), out_->p, h.size() * sizeof(std::uint64_t), cudaMemcpyDeviceToHost), "cudaMemcpy");
        return h;
    }
    /// Clears the output (so a CTA that wrote nothing is seen).
    void clear() { check(::cudaMemset(out_->p, 0xFF, out_count() * sizeof(std::uint64_t)), "cudaMemset"); }

    /// Per-CTA sums expected, given each piece's sum.
    [[nodiscard]] std::vector<std::uint64_t> expected(
        const std::function<std::uint64_t(std::uint32_t, std::uint32_t, std::int32_t)>& piece) const {
        std::vector<std::uint64_t> e(out_count(), 0);
        for (std::uint32_t l = 0; l < layers_; ++l) {
            for (int s = 0; s < batch_; ++s) {
                const auto& seq = tables_[static_cast<std::size_t>(s)];
                for (std::size_t i = 0; i < seq.size(); ++i) {
                    const std::size_t split = i / chunk_blocks;
                    e[(std::size_t{l} * static_cast<std::size_t>(batch_) + static_cast<std::size_t>(s)) *
                          static_cast<std::size_t>(splits_) + split] += piece(l, 0, seq[i]) + piece(l, 1, seq[i]);
                }
            }
        }
        // Splits past a sequence's end wrote 0.
        return e;
    }

    [[nodiscard]] int splits() const { return splits_; }

private:
    [[nodiscard]] launch_tables tabs() const { return {table_->p, counts_->p, stride_}; }

    tables_t tables_;
    std::uint32_t layers_;
    int batch_;
    int stride_ = 0;
    int splits_ = 0;
    std::unique_ptr<device_array<std::int32_t>> table_, counts_;
    std::unique_ptr<device_array<std::uint64_t>> out_;
    cudaEvent_t start_{}, stop_{};
};

/// Empty string when `got` equals `want`, else what differs.
std::string compare_sums(const std::vector<std::uint64_t>& got, const std::vector<std::uint64_t>& want) {
    std::size_t wrong = 0, first = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        if (got[i] != want[i]) {
            if (wrong++ == 0) {
                first = i;
            }
        }
    }
    if (wrong == 0) {
        return {};
    }
    return "checksum: " + std::to_string(wrong) + " of " + std::to_string(got.size()) + " CTA sums wrong, first at " +
           std::to_string(first) + " (" + std::to_string(got[first]) + " instead of " + std::to_string(want[first]) + ")";
}

// ---------------------------------------------------------------------------------------------
// Subjects: memory holding the trace's live blocks, and how to address it

/// Memory under test: its addressing and the tables of its live blocks (engine order).
struct subject {
    addressing addr;
    tables_t tables;  // engine order (or contiguous for the baseline)
    std::string error;  // set when building it failed
    virtual ~subject() = default;
};

/// A kv_cache of Config and Layout after the engine's trace; its addressing derived from
/// kv_cache::address and checked against it for every live piece.
template <class Config, class Layout>
struct kv_subject : subject {
    using cache_type = vmmpp::kv_cache<Config, Layout>;
    std::unique_ptr<cache_type> cache;

    explicit kv_subject(const trace& tr) {
        const vmmpp::kv_geometry g = make_geometry(n_layers, tr.max_blocks);
        if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
            const std::size_t limit = 2 * g.total_bytes() + GiB;
            vmmpp::budget budget(limit);
            cache = std::make_unique<cache_type>(g, typename Config::backing_type::options{},
                                                 typename Config::growth_type{}, budget.register_model("decode", limit));
        } else {
            cache = std::make_unique<cache_type>(g);
        }
        std::map<int, vmmpp::seq_id> ids;
        for (const auto& op : tr.ops) {
            switch (op.kind) {
            case trace_op::add: ids[op.seq] = cache->add_sequence(); break;
            case trace_op::append: (void)cache->append(ids.at(op.seq), op.tokens); break;
            case trace_op::free: cache->free(ids.at(op.seq)); ids.erase(op.seq); break;
            }
        }
        for (std::size_t i = 0; i < tr.finals.size(); ++i) {
            const auto t = cache->block_table(ids.at(tr.finals[i]));
            tables.emplace_back(t.begin(), t.end());
            if (tables.back() != tr.tables[i]) {
                throw std::runtime_error("kv_cache's block table of sequence " + std::to_string(i) +
                                         " differs from the trace's reference");
            }
        }
        auto at = [&](std::uint32_t l, vmmpp::kv_part p, std::int32_t b) { return cache->address(l, p, b); };
        addr.base = at(0, vmmpp::kv_part::key, 0);
        addr.block_stride = static_cast<std::size_t>(at(0, vmmpp::kv_part::key, 1) - addr.base);
        addr.part_stride = static_cast<std::size_t>(at(0, vmmpp::kv_part::value, 0) - addr.base);
        const std::size_t l1 = static_cast<std::size_t>(at(1, vmmpp::kv_part::key, 0) - addr.base);
        if (std::is_same_v<Layout, vmmpp::block_major>) {
            addr.group = n_layers;
            addr.layer_stride = l1;
        } else {
            addr.group = 1;
            addr.group_stride = l1;
        }
        for (const auto& seq : tables) {
            for (auto b : seq) {
                for (std::uint32_t l = 0; l < n_layers; ++l) {
                    for (auto p : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
                        if (addr.at(l, static_cast<std::uint32_t>(p), b) != at(l, p, b)) {
                            throw std::runtime_error("derived addressing differs from kv_cache::address at layer " +
                                                     std::to_string(l) + ", block " + std::to_string(b));
                        }
                    }
                }
            }
        }
    }
};

/// Raw memory: one cudaMalloc, or a vmmpp pool of Config with everything committed.
struct raw_memory {
    virtual ~raw_memory() = default;
    [[nodiscard]] virtual std::byte* data() const = 0;
};
struct cuda_malloc_memory : raw_memory {
    std::byte* p = nullptr;
    explicit cuda_malloc_memory(std::size_t bytes) {
        void* v = nullptr;
        check(::cudaMalloc(&v, bytes), "cudaMalloc");
        p = static_cast<std::byte*>(v);
    }
    ~cuda_malloc_memory() override { (void)::cudaFree(p); }
    [[nodiscard]] std::byte* data() const override { return p; }
};
template <class Config>
struct pool_memory : raw_memory {
    std::unique_ptr<vmmpp::elastic_pool<Config>> pool;
    std::size_t bytes;
    explicit pool_memory(std::size_t n) : bytes((n + 2 * MiB - 1) / (2 * MiB) * (2 * MiB)) {
        if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
            const std::size_t limit = 2 * bytes + GiB;
            vmmpp::budget budget(limit);
            pool = std::make_unique<vmmpp::elastic_pool<Config>>(bytes, typename Config::backing_type::options{},
                                                                  typename Config::growth_type{},
                                                                  budget.register_model("decode", limit));
        } else {
            pool = make_pool<Config>(bytes);
        }
        pool->ensure_committed(0, bytes);
    }
    ~pool_memory() override { pool->release(0, bytes); }
    [[nodiscard]] std::byte* data() const override { return pool->base(); }
};

enum class alloc_kind { cuda_malloc, vmm_page, vmm_extents };

/// An arrangement by hand: layers in groups of `group` (32: block_major; 1: layer_major), a
/// block's group `pad` bytes longer than its pieces, the start `offset` bytes into the buffer.
struct arrangement {
    std::uint32_t group = n_layers;
    std::size_t pad = 0;
    std::size_t offset = 0;
};

struct raw_subject : subject {
    std::unique_ptr<raw_memory> memory;

    raw_subject(alloc_kind kind, arrangement arr, tables_t t) {
        tables = std::move(t);
        const std::size_t blocks = static_cast<std::size_t>(max_id(tables)) + 1;
        addr.group = arr.group;
        addr.part_stride = piece_bytes;
        std::size_t bytes = 0;
        if (arr.group == 1) {  // layer_major: a region per (layer, part)
            const std::size_t region = (blocks * piece_bytes + arr.pad + 2 * MiB - 1) / (2 * MiB) * (2 * MiB);
            addr.block_stride = piece_bytes;
            addr.part_stride = region;
            addr.group_stride = 2 * region;
            bytes = 2 * n_layers * region;
        } else {
            addr.layer_stride = 2 * piece_bytes;
            addr.block_stride = 2 * piece_bytes * arr.group + arr.pad;
            addr.group_stride = blocks * addr.block_stride;
            bytes = (n_layers / arr.group) * addr.group_stride;
        }
        bytes += arr.offset;
        switch (kind) {
        case alloc_kind::cuda_malloc: memory = std::make_unique<cuda_malloc_memory>(bytes); break;
        case alloc_kind::vmm_page: memory = std::make_unique<pool_memory<vmmpp::elastic_page_config>>(bytes); break;
        case alloc_kind::vmm_extents: memory = std::make_unique<pool_memory<vmmpp::elastic_config>>(bytes); break;
        }
        addr.base = memory->data() + arr.offset;
    }
};

/// One subject alive at a time, kept while consecutive benchmarks (and repetitions) name it, so
/// it is built and filled once.
struct held_subject {
    std::string key;
    std::unique_ptr<subject> s;
};
held_subject& holder() {
    static held_subject h;
    return h;
}

subject* get_subject(const std::string& key, const std::function<std::unique_ptr<subject>()>& make) {
    auto& h = holder();
    if (h.key == key && h.s) {
        return h.s.get();
    }
    h.s.reset();  // the last one's memory goes first
    h.key = key;
    try {
        h.s = make();
        reader r(h.s->tables, n_layers);
        r.fill(h.s->addr);
    } catch (const std::exception& e) {
        h.s = std::make_unique<subject>();
        h.s->error = e.what();
    }
    return h.s.get();
}

/// Distinct 2 MiB virtual pages one layer's K and V pieces lie in, averaged over layers.
double pages_per_layer(const addressing& a, const tables_t& t) {
    double sum = 0;
    for (std::uint32_t l = 0; l < n_layers; ++l) {
        std::set<std::uintptr_t> pages;
        for (const auto& seq : t) {
            for (auto b : seq) {
                for (std::uint32_t p = 0; p < 2; ++p) {
                    const auto first = reinterpret_cast<std::uintptr_t>(a.at(l, p, b));
                    for (std::uintptr_t x = first / (2 * MiB); x <= (first + piece_bytes - 1) / (2 * MiB); ++x) {
                        pages.insert(x);
                    }
                }
            }
        }
        sum += static_cast<double>(pages.size());
    }
    return sum / n_layers;
}

int trailing_zeros(std::uintptr_t x) {
    int n = 0;
    while (x != 0 && (x & 1) == 0) {
        x >>= 1;
        ++n;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// The benchmark

enum class table_kind { engine, sorted };
constexpr int timed_iterations = 20;

void run_read(benchmark::State& state, const std::string& key, const std::function<std::unique_ptr<subject>()>& make,
              table_kind tk, bool all_layers, const std::string& baseline) {
    if (!has_gpu()) {
        state.SkipWithError("no CUDA device");
        return;
    }
    try {
        init_cuda_runtime();
        subject* s = get_subject(key, make);
        if (!s->error.empty()) {
            state.SkipWithError(s->error.c_str());
            return;
        }
        const tables_t t = tk == table_kind::sorted ? sorted_tables(s->tables) : s->tables;
        reader r(t, n_layers);
        r.clear();
        (void)r.read(s->addr, all_layers);  // warm-up, checked
        const std::string wrong = compare_sums(r.sums(), r.expected(piece_sum));
        if (!wrong.empty()) {
            state.SkipWithError(wrong.c_str());
            return;
        }
        samples gbps(state);
        double seconds = 0;
        for (auto _ : state) {
            const double sec = r.read(s->addr, all_layers);
            seconds += sec;
            gbps.add(r.bytes() / sec * 1e-9);
            state.SetIterationTime(sec);
        }
        gbps.report(state, "GBps", 1.0);
        state.counters["GBps"] = r.bytes() * static_cast<double>(state.iterations()) / seconds * 1e-9;
        state.counters["bytes"] = r.bytes();
        state.counters["blocks"] = static_cast<double>(total_blocks(t));
        state.counters["max_block_id"] = static_cast<double>(max_id(t));
        state.counters["pages_per_layer"] = pages_per_layer(s->addr, t);
        state.counters["base_align_log2"] = trailing_zeros(reinterpret_cast<std::uintptr_t>(s->addr.base));
        state.counters["block_stride"] = static_cast<double>(s->addr.block_stride);
        state.counters["splits"] = r.splits();
        if (!baseline.empty()) {
            state.SetLabel("baseline=" + baseline);
        }
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

/// check/small/<config>/<layout>: a small cache (4 layers, 3 sequences), every live piece
/// written through kv_cache::address with random bytes, the read's per-CTA sums against sums of
/// those bytes on the host, both launch modes.
template <class Config, class Layout>
void BM_check_small(benchmark::State& state) {
    if (!has_gpu()) {
        state.SkipWithError("no CUDA device");
        return;
    }
    try {
        init_cuda_runtime();
        constexpr std::uint32_t layers = 4;
        const vmmpp::kv_geometry g = make_geometry(layers, 256);
        using cache_type = vmmpp::kv_cache<Config, Layout>;
        std::unique_ptr<cache_type> cache;
        if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
            vmmpp::budget budget(4 * GiB);
            cache = std::make_unique<cache_type>(g, typename Config::backing_type::options{},
                                                 typename Config::growth_type{}, budget.register_model("check", 4 * GiB));
        } else {
            cache = std::make_unique<cache_type>(g);
        }
        // Three sequences appended interleaved, one freed in between: scattered ids.
        std::vector<vmmpp::seq_id> seqs{cache->add_sequence(), cache->add_sequence(), cache->add_sequence()};
        const vmmpp::seq_id gone = cache->add_sequence();
        for (int round = 0; round < 20; ++round) {
            for (std::size_t i = 0; i < seqs.size(); ++i) {
                (void)cache->append(seqs[i], 16 + 8 * i);
            }
            if (round < 10) {
                (void)cache->append(gone, 16);
            } else if (round == 10) {
                cache->free(gone);
            }
        }
        tables_t t;
        for (auto s : seqs) {
            const auto bt = cache->block_table(s);
            t.emplace_back(bt.begin(), bt.end());
        }
        std::mt19937 rng(7);
        std::map<std::tuple<std::uint32_t, std::uint32_t, std::int32_t>, std::uint64_t> sums;
        std::vector<std::uint32_t> words(piece_words);
        for (const auto& seq : t) {
            for (auto b : seq) {
                for (std::uint32_t l = 0; l < layers; ++l) {
                    for (std::uint32_t p = 0; p < 2; ++p) {
                        std::uint64_t sum = 0;
                        for (auto& w : words) {
                            w = static_cast<std::uint32_t>(rng());
                            sum += w;
                        }
                        sums[{l, p, b}] = sum;
                        check(::cudaMemcpy(cache->address(l, static_cast<vmmpp::kv_part>(p), b), words.data(),
                                           piece_bytes, cudaMemcpyHostToDevice),
                              "cudaMemcpy");
                    }
                }
            }
        }
        addressing a;
        a.base = cache->address(0, vmmpp::kv_part::key, 0);
        a.block_stride = static_cast<std::size_t>(cache->address(0, vmmpp::kv_part::key, 1) - a.base);
        a.part_stride = static_cast<std::size_t>(cache->address(0, vmmpp::kv_part::value, 0) - a.base);
        const auto l1 = static_cast<std::size_t>(cache->address(1, vmmpp::kv_part::key, 0) - a.base);
        if (std::is_same_v<Layout, vmmpp::block_major>) {
            a.group = layers;
            a.layer_stride = l1;
        } else {
            a.group = 1;
            a.group_stride = l1;
        }
        reader r(t, layers);
        const auto want = r.expected([&](std::uint32_t l, std::uint32_t p, std::int32_t b) { return sums.at({l, p, b}); });
        for (auto _ : state) {
            for (bool all : {false, true}) {
                r.clear();
                (void)r.read(a, all);
                const std::string wrong = compare_sums(r.sums(), want);
                if (!wrong.empty()) {
                    state.SkipWithError((std::string(all ? "all_layers " : "per_layer ") + wrong).c_str());
                    return;
                }
            }
        }
        state.counters["ctas_checked"] = static_cast<double>(r.out_count());
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

// ---------------------------------------------------------------------------------------------
// Registration (in this order: subjects are built once and kept while consecutive benchmarks
// name them)

template <class Config>
const char* cfg_name() {
    if constexpr (std::is_same_v<Config, vmmpp::elastic_page_config>) {
        return "elastic_page_config";
    } else {
        return config_name<Config>::value;
    }
}

void reg(const std::string& name, const std::string& key, std::function<std::unique_ptr<subject>()> make,
         table_kind tk, bool all_layers, const std::string& baseline) {
    benchmark::RegisterBenchmark(name.c_str(),
                                 [=](benchmark::State& st) { run_read(st, key, make, tk, all_layers, baseline); })
        ->UseManualTime()
        ->Iterations(timed_iterations)
        ->Repetitions(3)
        ->Unit(benchmark::kMicrosecond);
}

const char* mode_name(bool all) { return all ? "all_layers" : "per_layer"; }

std::string baseline_name(bool all) { return std::string("baseline/cudaMalloc/layer_major/contiguous/") + mode_name(all); }

template <class Config, class Layout>
void reg_kv() {
    const std::string subj = std::string("kv/") + cfg_name<Config>() + "/" + Layout::name;
    auto make = [] { return std::unique_ptr<subject>(std::make_unique<kv_subject<Config, Layout>>(the_trace())); };
    for (bool all : {false, true}) {
        reg(subj + "/engine/" + mode_name(all), subj, make, table_kind::engine, all, baseline_name(all));
    }
    reg(subj + "/sorted/per_layer", subj, make, table_kind::sorted, false, baseline_name(false));
}

void reg_raw(const std::string& alloc, alloc_kind kind, const std::string& arr_name, arrangement arr, bool both_modes) {
    const std::string subj = "raw/" + alloc + "/" + arr_name;
    auto make = [=] { return std::unique_ptr<subject>(std::make_unique<raw_subject>(kind, arr, the_trace().tables)); };
    reg(subj + "/engine/per_layer", subj, make, table_kind::engine, false, baseline_name(false));
    if (both_modes) {
        reg(subj + "/engine/all_layers", subj, make, table_kind::engine, true, baseline_name(true));
    }
}

void register_all() {
    benchmark::RegisterBenchmark("check/small/static_config/block_major",
                                 BM_check_small<vmmpp::static_config, vmmpp::block_major>)->Iterations(1);
    benchmark::RegisterBenchmark("check/small/static_config/layer_major",
                                 BM_check_small<vmmpp::static_config, vmmpp::layer_major>)->Iterations(1);
    benchmark::RegisterBenchmark("check/small/elastic_config/block_major",
                                 BM_check_small<vmmpp::elastic_config, vmmpp::block_major>)->Iterations(1);
    benchmark::RegisterBenchmark("check/small/elastic_config/layer_major",
                                 BM_check_small<vmmpp::elastic_config, vmmpp::layer_major>)->Iterations(1);
    benchmark::RegisterBenchmark("check/small/elastic_page_config/block_major",
                                 BM_check_small<vmmpp::elastic_page_config, vmmpp::block_major>)->Iterations(1);
    benchmark::RegisterBenchmark("check/small/elastic_page_config/layer_major",
                                 BM_check_small<vmmpp::elastic_page_config, vmmpp::layer_major>)->Iterations(1);

    // The baseline: one cudaMalloc, layer_major, ids 0..n-1 dealt to the sequences in order.
    {
        const std::string key = "baseline/cudaMalloc/layer_major";
        auto make = [] {
            return std::unique_ptr<subject>(std::make_unique<raw_subject>(
                alloc_kind::cuda_malloc, arrangement{1, 0, 0}, contiguous_tables(the_trace().tables)));
        };
        for (bool all : {false, true}) {
            reg(baseline_name(all), key, make, table_kind::engine, all, "");
        }
    }
    reg_kv<vmmpp::static_config, vmmpp::block_major>();
    reg_kv<vmmpp::static_config, vmmpp::layer_major>();
    reg_kv<vmmpp::elastic_config, vmmpp::block_major>();
    reg_kv<vmmpp::elastic_config, vmmpp::layer_major>();
    reg_kv<vmmpp::elastic_page_config, vmmpp::block_major>();
    reg_kv<vmmpp::elastic_page_config, vmmpp::layer_major>();

    // The explanations, on memory arranged by hand with the engine's tables.
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "block_major", {n_layers, 0, 0}, true);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "layer_major", {1, 0, 0}, true);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "block_major+256B", {n_layers, 256, 0}, false);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "block_major+4KiB", {n_layers, 4096, 0}, true);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "block_major+64KiB", {n_layers, 64 * 1024, 0}, false);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "block_major@+4KiB", {n_layers, 0, 4096}, false);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "block_major@+1MiB", {n_layers, 0, MiB}, false);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "group8", {8, 0, 0}, false);
    reg_raw("cudaMalloc", alloc_kind::cuda_malloc, "group2", {2, 0, 0}, false);
    reg_raw("vmm_page", alloc_kind::vmm_page, "block_major", {n_layers, 0, 0}, true);
    reg_raw("vmm_page", alloc_kind::vmm_page, "block_major+4KiB", {n_layers, 4096, 0}, false);
    reg_raw("vmm_extents", alloc_kind::vmm_extents, "block_major", {n_layers, 0, 0}, false);
}

} // namespace

#ifndef VMMPP_DECODE_READ_NO_MAIN  // a host-side test includes this file
int main(int argc, char** argv) {
    benchmark::AddCustomContext("decode_read_trace_blocks", std::to_string(total_blocks(the_trace().tables)));
    benchmark::AddCustomContext("decode_read_max_blocks", std::to_string(the_trace().max_blocks));
    register_all();
    const int rc = vmmpp_bench::run_benchmarks(argc, argv);
    holder().s.reset();
    return rc;
}
#endif
