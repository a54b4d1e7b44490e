// CUDA graphs over growing memory (issue 31): a decode step captured once, as a CUDA graph, stays
// valid while the cache under it grows into new pages, frees, gives its memory back and grows
// again past its previous peak, with no re-capture and no graph update.
//
// The graph (captured on a non-default stream before the first sequence exists, so for the elastic
// configurations over a cache with no memory committed at all) is one engine step:
//   1. a memset node zeroes the per-row results;
//   2. write_new_tokens writes each new token's value into its slot (the slot mapping) in every
//      layer's K and V (a few words per token: every head's first word);
//   3. read_rows reads every token of every row through the block table, in every layer's K and V,
//      and sums a position-keyed hash of the words read, per row.
// It reads its inputs from device buffers of fixed, maximal size: block tables [max_seqs,
// max_blocks_per_seq] int32, row lengths, the step's slot mapping and token values, the count of
// new tokens. Launch shapes are fixed: the kernels loop over what the counts say.
//
// Inputs reach the device by cudaMemcpyAsync from pinned staging buffers on the graph's stream,
// outside the graph, before each cudaGraphLaunch. Not captured memcpy nodes: a memcpy node has a
// fixed size and a fixed host address, so the engine would have to copy the whole maximal buffers
// every step, from one host buffer it may not rewrite while the last launch may still read it;
// outside the graph it copies only the rows and tokens of this step, from any of two staging sets
// (the host prepares step k+1 while step k runs). The order is the stream's either way.
//
// Between launches the host does what an engine does: every running sequence gets one token (an
// append that may take a block on a new page), new sequences are admitted with a prompt (written
// by the same graph: a step's new tokens are decode tokens and whole prompts), a sequence that
// reached its length is freed with free(seq, stream) right after the launch that last reads it
// (its memory goes back once that launch has run). The run has rounds; each grows the cache to a
// larger cap of blocks than the one before, then frees every sequence after the last launch,
// waits, trims and collects: for the elastic configurations the committed bytes must fall to 0,
// and then rise again with the next round. An empty step is launched while nothing is committed.
//
// Checked: every row of every step equals the host's model of every token's value (hash and words
// read); one instantiation, and the same executable graph, for the whole run; the cache's tensor
// addresses (baked into the graph's kernel parameters) never change; no CUDA error; for the
// elastic configurations committed memory went to 0 after each round and up again (for
// elastic_page_config to a higher peak each round); the block peak grew each round.
#define VMMPP_GPU_TEST_NAME "gpu cuda graph"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"
#include "support/gpu_kv.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/config_list.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/type_list.hpp"

using namespace vmmpp_test;

namespace {

using graph_cases = paged_engine_cases;

// 8 layers of 8 heads of 128 (bf16), 16 tokens a block: a block_major block is 512 KiB (4 a
// 2 MiB page), a layer_major piece 32 KiB (64 a page in each of 16 regions); 512 blocks span
// 128 pages either way, and a few hundred live blocks span dozens of them.
constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                  .block_tokens = 16, .max_blocks = 512};
constexpr int max_seqs = 32;             // rows of the graph's block tables
constexpr int max_blocks_per_seq = 64;   // columns: 1024 tokens a sequence
constexpr int max_step_tokens = 4096;    // new tokens one step may write (decode tokens and prompts)
constexpr int max_parts = 2 * 8;         // layers x {K, V}
constexpr int element_bytes = 2;         // bf16

__host__ __device__ inline std::uint32_t mix32(std::uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/// Where a token's words lie: layer-and-part lp's element [block, offset, head, 0] is at
/// base[lp] + block * block_stride + offset * token_stride + head * head_stride (bytes). The
/// pointers are the cache's tensors', baked into the graph's kernel parameters at capture.
struct kv_addressing {
    unsigned char* base[max_parts];
    long long block_stride, token_stride, head_stride;
    int parts, heads, block_tokens;
};

/// The word stored for a token of value v in layer-and-part lp, head h.
__host__ __device__ inline std::uint32_t stored_word(std::uint32_t v, int lp, int h) {
    return v ^ mix32(static_cast<std::uint32_t>(lp) * 0x9E3779B1U + static_cast<std::uint32_t>(h) * 0x85EBCA77U +
                     0x51ED270BU);
}
/// What a word read at token position t adds to its row's hash (position-keyed: a block read in
/// the wrong place of the table changes the sum).
__host__ __device__ inline unsigned long long read_hash(std::uint32_t word, std::uint32_t t) {
    return mix32(word ^ (t * 0x9E3779B1U + 0x7F4A7C15U));
}

__device__ inline std::uint32_t* word_at(const kv_addressing& a, long long block, long long offset, int lp, int h) {
    return reinterpret_cast<std::uint32_t*>(a.base[lp] + block * a.block_stride + offset * a.token_stride +
                                            h * a.head_stride);
}

/// Writes the step's *count new tokens: token i's value into its slot, every layer-part and head.
__global__ void write_new_tokens(kv_addressing a, const std::int64_t* slots, const std::uint32_t* values,
                                 const int* count) {
    const long long per_token = static_cast<long long>(a.parts) * a.heads;
    const long long total = *count * per_token;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long t = i / per_token;
        const int lp = static_cast<int>((i / a.heads) % a.parts);
        const int h = static_cast<int>(i % a.heads);
        const long long slot = slots[t];
        *word_at(a, slot / a.block_tokens, slot % a.block_tokens, lp, h) = stored_word(values[t], lp, h);
    }
}

struct row_result {
    unsigned long long hash;   // sum of read_hash over every word read
    unsigned long long words;  // words read
};

/// Row blockIdx.y: reads tokens [0, lengths[row]) through its block table, every layer-part and
/// head, into results[row].
__global__ void read_rows(kv_addressing a, const std::int32_t* tables, const int* lengths, row_result* results) {
    const int row = blockIdx.y;
    const long long per_token = static_cast<long long>(a.parts) * a.heads;
    const long long total = lengths[row] * per_token;
    unsigned long long hash = 0, words = 0;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long t = i / per_token;
        const int lp = static_cast<int>((i / a.heads) % a.parts);
        const int h = static_cast<int>(i % a.heads);
        const long long block = tables[static_cast<long long>(row) * max_blocks_per_seq + t / a.block_tokens];
        hash += read_hash(*word_at(a, block, t % a.block_tokens, lp, h), static_cast<std::uint32_t>(t));
        ++words;
    }
    if (words != 0) {
        atomicAdd(&results[row].hash, hash);
        atomicAdd(&results[row].words, words);
    }
}

/// Device memory of n T, freed at the end of the test.
template <class T>
struct device_buffer {
    T* p = nullptr;
    explicit device_buffer(std::size_t n) { cuda_check(cudaMalloc(&p, n * sizeof(T))); }
    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;
    ~device_buffer() { (void)cudaFree(p); }
};
/// Pinned host memory of n T.
template <class T>
struct pinned_buffer {
    T* p = nullptr;
    explicit pinned_buffer(std::size_t n) { cuda_check(cudaMallocHost(&p, n * sizeof(T))); }
    pinned_buffer(const pinned_buffer&) = delete;
    pinned_buffer& operator=(const pinned_buffer&) = delete;
    ~pinned_buffer() { (void)cudaFreeHost(p); }
};

/// The graph's inputs and output: device buffers of maximal size, allocated once.
struct step_buffers {
    device_buffer<std::int32_t> tables{std::size_t{max_seqs} * max_blocks_per_seq};
    device_buffer<int> lengths{max_seqs};
    device_buffer<std::int64_t> slots{max_step_tokens};
    device_buffer<std::uint32_t> values{max_step_tokens};
    device_buffer<int> count{1};
    device_buffer<row_result> results{max_seqs};
};

/// One of two host staging sets: what a step copies in and out, the event after its copy back,
/// and the rows it expects.
struct staging_set {
    struct expected_row {
        vmmpp::seq_id seq;
        unsigned long long hash, words;
    };
    pinned_buffer<std::int32_t> tables{std::size_t{max_seqs} * max_blocks_per_seq};
    pinned_buffer<int> lengths{max_seqs};
    pinned_buffer<std::int64_t> slots{max_step_tokens};
    pinned_buffer<std::uint32_t> values{max_step_tokens};
    pinned_buffer<int> count{1};
    pinned_buffer<row_result> results{max_seqs};
    cudaEvent_t done = nullptr;
    bool in_flight = false;
    std::size_t step = 0;
    std::vector<expected_row> expected;
    staging_set() { cuda_check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming)); }
    staging_set(const staging_set&) = delete;
    staging_set& operator=(const staging_set&) = delete;
    ~staging_set() { (void)cudaEventDestroy(done); }
};

/// A cache of `Case` on `stream` (its own copies: none here, no forks), with a budget of twice its
/// span for the shared_budget configurations (no budget pressure: only the rounds move memory).
template <class Case>
struct made_cache {
    using config = typename Case::config;
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<typename Case::cache> cache;
    made_cache(const vmmpp::kv_geometry& g, cudaStream_t stream) {
        const vmmpp::kv_cache_options options{.stream = stream};
        using growth = typename config::growth_type;
        using backing_options = typename config::backing_type::options;
        if constexpr (std::is_same_v<typename config::quota_type, vmmpp::shared_budget>) {
            const std::size_t bytes = 2 * (Case::layout::span_bytes(g) / (2 * MiB) + 1) * (2 * MiB);
            budget = std::make_unique<vmmpp::budget>(bytes);
            cache = std::make_unique<typename Case::cache>(g, backing_options{}, growth{},
                                                           budget->register_model("kv", bytes), options);
        } else {
            cache = std::make_unique<typename Case::cache>(g, backing_options{}, growth{}, typename config::quota_type{},
                                                           options);
        }
    }
};

/// The engine around the graph: sequences, the host model of their tokens' hashes, the steps.
template <class Case>
class graph_engine {
public:
    using cache_type = typename Case::cache;

    graph_engine(cache_type& cache, cudaStream_t stream, std::uint64_t seed)
        : cache_(cache), stream_(stream), rng_(seed) {
        const auto& g = cache.geometry();
        BOOST_REQUIRE(2 * g.layers <= static_cast<std::uint32_t>(max_parts));
        a_.parts = static_cast<int>(2 * g.layers);
        a_.heads = static_cast<int>(g.kv_heads);
        a_.block_tokens = static_cast<int>(g.block_tokens);
        const vmmpp::kv_tensor k0 = cache.tensor(0, vmmpp::kv_part::key);
        a_.block_stride = k0.strides[0] * element_bytes;
        a_.token_stride = k0.strides[1] * element_bytes;
        a_.head_stride = k0.strides[2] * element_bytes;
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            for (int p = 0; p < 2; ++p) {
                const vmmpp::kv_tensor t = cache.tensor(l, p == 0 ? vmmpp::kv_part::key : vmmpp::kv_part::value);
                BOOST_REQUIRE(t.strides[0] * element_bytes == a_.block_stride);
                BOOST_REQUIRE(t.strides[1] * element_bytes == a_.token_stride);
                BOOST_REQUIRE(t.strides[2] * element_bytes == a_.head_stride);
                a_.base[2 * l + p] = static_cast<unsigned char*>(t.data);
            }
        }
        base0_ = cache.address(0, vmmpp::kv_part::key, 0);
    }
    graph_engine(const graph_engine&) = delete;
    graph_engine& operator=(const graph_engine&) = delete;
    ~graph_engine() {
        (void)cudaStreamSynchronize(stream_);
        if (exec_ != nullptr) {
            (void)cudaGraphExecDestroy(exec_);
        }
        if (graph_ != nullptr) {
            (void)cudaGraphDestroy(graph_);
        }
    }

    /// Captures the step once and instantiates it: the only capture and instantiation of the run.
    /// Thread-local capture mode: the pool's release agent thread may call the driver meanwhile,
    /// and a global-mode capture may refuse other threads' calls it deems unsafe.
    void capture() {
        BOOST_REQUIRE(graph_ == nullptr);
        cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        cuda_check(cudaMemsetAsync(buffers_.results.p, 0, max_seqs * sizeof(row_result), stream_));
        write_new_tokens<<<128, 256, 0, stream_>>>(a_, buffers_.slots.p, buffers_.values.p, buffers_.count.p);
        cuda_check(cudaGetLastError());
        read_rows<<<dim3(32, max_seqs), 256, 0, stream_>>>(a_, buffers_.tables.p, buffers_.lengths.p,
                                                          buffers_.results.p);
        cuda_check(cudaGetLastError());
        cuda_check(cudaStreamEndCapture(stream_, &graph_));
        std::size_t nodes = 0;
        cuda_check(cudaGraphGetNodes(graph_, nullptr, &nodes));
        BOOST_TEST(nodes == 3u);
        cuda_check(cudaGraphInstantiate(&exec_, graph_, 0));
        ++instantiations_;
        first_exec_ = exec_;
    }

    /// One step: decode tokens for the running sequences, admissions while `admit` and under `cap`
    /// reserved blocks, the inputs copied in, the graph launched, the results copied back; then
    /// the sequences that got their last token (every one, with `finish_all`) are freed on the
    /// stream, right after the launch.
    void step(bool admit, std::size_t cap, bool finish_all) {
        staging_set& s = sets_[steps_ % 2];
        retire(s);  // the step two back, which used this set: done, and checked
        int n = 0;
        // Decode: every running sequence gets one token.
        for (live& q : live_) {
            add_tokens(q, 1, s, n);
        }
        // Admission: prompts of 16-448 tokens decoding 8-48 more, while the reserved blocks
        // (every live sequence's final length) stay under the cap and the step's tokens fit.
        while (admit && live_.size() < static_cast<std::size_t>(max_seqs)) {
            const std::size_t prompt = std::uniform_int_distribution<std::size_t>(16, 448)(rng_);
            const std::size_t target = prompt + std::uniform_int_distribution<std::size_t>(8, 48)(rng_);
            const std::size_t need = cache_.blocks_needed(target);
            if (reserved_ + need > cap || n + static_cast<int>(prompt) > max_step_tokens) {
                break;
            }
            live_.push_back(live{cache_.add_sequence(), target, 0, 0});
            reserved_ += need;
            ++admitted_;
            add_tokens(live_.back(), prompt, s, n);
        }
        // The rows: the live sequences in order, the rest empty.
        std::vector<vmmpp::seq_id> rows;
        s.expected.clear();
        for (const live& q : live_) {
            rows.push_back(q.id);
            s.expected.push_back({q.id, q.hash, q.words});
            BOOST_REQUIRE(cache_.block_table(q.id).size() <= static_cast<std::size_t>(max_blocks_per_seq));
        }
        const std::size_t table_ints = rows.size() * max_blocks_per_seq;
        cache_.pack_block_tables(rows, max_blocks_per_seq, std::span<std::int32_t>(s.tables.p, table_ints));
        for (int r = 0; r < max_seqs; ++r) {
            s.lengths.p[r] = r < static_cast<int>(rows.size()) ? static_cast<int>(cache_.tokens(rows[r])) : 0;
        }
        *s.count.p = n;
        // In: only what this step uses (table rows, new tokens); the lengths whole (rows emptied).
        copy_in(buffers_.tables.p, s.tables.p, table_ints);
        copy_in(buffers_.lengths.p, s.lengths.p, max_seqs);
        copy_in(buffers_.slots.p, s.slots.p, static_cast<std::size_t>(n));
        copy_in(buffers_.values.p, s.values.p, static_cast<std::size_t>(n));
        copy_in(buffers_.count.p, s.count.p, 1);
        BOOST_REQUIRE(exec_ == first_exec_);
        cuda_check(cudaGraphLaunch(exec_, stream_));
        cuda_check(cudaMemcpyAsync(s.results.p, buffers_.results.p, max_seqs * sizeof(row_result),
                                   cudaMemcpyDeviceToHost, stream_));
        cuda_check(cudaEventRecord(s.done, stream_));
        s.in_flight = true;
        s.step = steps_++;
        new_tokens_ += static_cast<std::size_t>(n);
        // Finished sequences go right after the launch that last reads them: stream-ordered.
        for (auto it = live_.begin(); it != live_.end();) {
            if (finish_all || cache_.tokens(it->id) >= it->target) {
                cache_.free(it->id, stream_);
                reserved_ -= cache_.blocks_needed(it->target);
                ++freed_;
                it = live_.erase(it);
            } else {
                ++it;
            }
        }
        cuda_check(cudaGetLastError());
    }

    /// Waits for both staging sets' steps and checks them.
    void retire_all() {
        retire(sets_[0]);
        retire(sets_[1]);
    }

    [[nodiscard]] bool idle() const noexcept { return live_.empty(); }
    [[nodiscard]] std::size_t steps() const noexcept { return steps_; }
    [[nodiscard]] std::size_t rows_checked() const noexcept { return rows_checked_; }
    [[nodiscard]] std::size_t rows_wrong() const noexcept { return rows_wrong_; }
    [[nodiscard]] unsigned long long words_checked() const noexcept { return words_checked_; }
    [[nodiscard]] std::size_t admitted() const noexcept { return admitted_; }
    [[nodiscard]] std::size_t freed() const noexcept { return freed_; }
    [[nodiscard]] std::size_t new_tokens() const noexcept { return new_tokens_; }
    [[nodiscard]] int instantiations() const noexcept { return instantiations_; }
    [[nodiscard]] const std::string& first_wrong() const noexcept { return first_wrong_; }
    /// Whether every tensor address baked into the graph is still the cache's.
    [[nodiscard]] bool addresses_unchanged() const {
        if (cache_.address(0, vmmpp::kv_part::key, 0) != base0_) {
            return false;
        }
        for (std::uint32_t l = 0; l < cache_.geometry().layers; ++l) {
            for (int p = 0; p < 2; ++p) {
                const auto t = cache_.tensor(l, p == 0 ? vmmpp::kv_part::key : vmmpp::kv_part::value);
                if (static_cast<unsigned char*>(t.data) != a_.base[2 * l + p]) {
                    return false;
                }
            }
        }
        return true;
    }

private:
    struct live {
        vmmpp::seq_id id;
        std::size_t target;        // tokens at which it finishes
        unsigned long long hash;   // the model: sum of read_hash over every word of every token
        unsigned long long words;  // words of every token (tokens x parts x heads)
    };

    /// Appends `count` tokens to q (on the graph's stream: a block freed behind a queued launch
    /// is written only after it), stages their slots and values, and adds them to the model.
    void add_tokens(live& q, std::size_t count, staging_set& s, int& n) {
        BOOST_REQUIRE(n + static_cast<int>(count) <= max_step_tokens);
        const auto r = cache_.append(q.id, count, stream_);
        cache_.slot_mapping(q.id, r.first, std::span<std::int64_t>(s.slots.p + n, count));
        for (std::size_t i = 0; i < count; ++i) {
            const std::uint32_t v = static_cast<std::uint32_t>(rng_()) | 1U;
            s.values.p[n + static_cast<int>(i)] = v;
            const auto t = static_cast<std::uint32_t>(r.first + i);
            for (int lp = 0; lp < a_.parts; ++lp) {
                for (int h = 0; h < a_.heads; ++h) {
                    q.hash += read_hash(stored_word(v, lp, h), t);
                }
            }
            q.words += static_cast<unsigned long long>(a_.parts) * a_.heads;
        }
        n += static_cast<int>(count);
    }

    template <class T>
    void copy_in(T* device, const T* host, std::size_t count) {
        if (count != 0) {
            cuda_check(cudaMemcpyAsync(device, host, count * sizeof(T), cudaMemcpyHostToDevice, stream_));
        }
    }

    void retire(staging_set& s) {
        if (!s.in_flight) {
            return;
        }
        cuda_check(cudaEventSynchronize(s.done));
        s.in_flight = false;
        for (int r = 0; r < max_seqs; ++r) {
            const row_result got = s.results.p[r];
            staging_set::expected_row want{0, 0, 0};
            if (r < static_cast<int>(s.expected.size())) {
                want = s.expected[static_cast<std::size_t>(r)];
            }
            ++rows_checked_;
            words_checked_ += got.words;
            if (got.hash != want.hash || got.words != want.words) {
                if (rows_wrong_++ == 0) {
                    first_wrong_ = "step " + std::to_string(s.step) + " row " + std::to_string(r) + " (sequence " +
                                   std::to_string(want.seq) + "): " + std::to_string(got.words) + " words read, " +
                                   std::to_string(want.words) + " expected; hash " + std::to_string(got.hash) +
                                   ", expected " + std::to_string(want.hash);
                }
            }
        }
    }

    cache_type& cache_;
    cudaStream_t stream_;
    std::mt19937_64 rng_;
    kv_addressing a_{};
    std::byte* base0_ = nullptr;
    step_buffers buffers_;
    staging_set sets_[2];
    cudaGraph_t graph_ = nullptr;
    cudaGraphExec_t exec_ = nullptr, first_exec_ = nullptr;
    int instantiations_ = 0;
    std::vector<live> live_;
    std::size_t reserved_ = 0;
    std::size_t steps_ = 0, admitted_ = 0, freed_ = 0, new_tokens_ = 0, rows_checked_ = 0, rows_wrong_ = 0;
    unsigned long long words_checked_ = 0;
    std::string first_wrong_;
};

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(captured_step_stays_valid_while_the_cache_grows_shrinks_and_regrows, Case, graph_cases) {
    using config = typename Case::config;
    constexpr bool elastic = config::growth_type::is_elastic;
    constexpr bool page_granular = std::is_same_v<typename config::growth_type, vmmpp::page_granular>;
    const test_stream stream;
    made_cache<Case> made(geom, stream);
    auto& c = *made.cache;
    graph_engine<Case> engine(c, stream, 31);
    const std::size_t committed_at_start = c.pool().committed_bytes();
    if constexpr (elastic) {
        BOOST_TEST(committed_at_start == 0u);  // the graph is captured over a cache with no memory
    }
    engine.capture();

    // Rounds of growth to a larger cap each, then everything freed, waited for and trimmed.
    const std::size_t caps[] = {geom.max_blocks * 30 / 100, geom.max_blocks * 58 / 100, geom.max_blocks * 88 / 100};
    constexpr int grow_steps = 96;
    std::vector<std::size_t> block_peaks, committed_peaks, committed_lows;
    bool committed_constant = true;  // static_config: nothing ever moves
    std::size_t committed_falls = 0;   // steps after which less was committed than after the one before
    std::size_t committed_last = committed_at_start;
    for (const std::size_t cap : caps) {
        std::size_t block_peak = 0, committed_peak = 0;
        auto observe = [&] {
            const std::size_t committed = c.pool().committed_bytes();
            block_peak = std::max(block_peak, c.used_blocks());
            committed_peak = std::max(committed_peak, committed);
            committed_constant = committed_constant && committed == committed_at_start;
            committed_falls += committed < committed_last ? 1 : 0;
            committed_last = committed;
        };
        for (int i = 0; i < grow_steps; ++i) {
            engine.step(true, cap, false);
            observe();
        }
        engine.step(false, cap, true);  // the last launch, then every sequence freed behind it
        observe();
        BOOST_TEST_REQUIRE(engine.idle());
        BOOST_TEST(c.used_blocks() == 0u);
        engine.retire_all();
        cuda_check(cudaStreamSynchronize(stream));
        (void)c.pool().trim();
        (void)c.collect();
        const std::size_t low = c.pool().committed_bytes();
        committed_last = low;
        if constexpr (elastic) {
            BOOST_TEST(low == 0u, "cap " << cap << ": " << low << " bytes still committed after trim");
        } else {
            BOOST_TEST(low == committed_at_start);
        }
        BOOST_TEST(engine.addresses_unchanged());
        // The graph over a cache with nothing live (and, elastic, nothing committed): it touches nothing.
        engine.step(false, cap, false);
        engine.retire_all();
        block_peaks.push_back(block_peak);
        committed_peaks.push_back(committed_peak);
        committed_lows.push_back(low);
    }
    cuda_check(cudaStreamSynchronize(stream));
    cuda_check(cudaGetLastError());

    BOOST_TEST(engine.rows_wrong() == 0u, engine.rows_wrong() << " of " << engine.rows_checked()
                                                              << " rows read wrong; first: " << engine.first_wrong());
    BOOST_TEST(engine.words_checked() > 0u);
    BOOST_TEST(engine.instantiations() == 1);
    BOOST_TEST(engine.addresses_unchanged());
    BOOST_TEST(engine.freed() == engine.admitted());
    for (std::size_t r = 0; r < block_peaks.size(); ++r) {
        // The memory under the peak's blocks was there...
        BOOST_TEST(committed_peaks[r] >= block_peaks[r] * geom.block_bytes(), "round " << r);
        if (r > 0) {
            // ... and each round grew past the one before, after its memory had gone back.
            BOOST_TEST(block_peaks[r] > block_peaks[r - 1], "round " << r << ": block peak " << block_peaks[r]
                                                                     << " not above " << block_peaks[r - 1]);
            if constexpr (elastic) {
                BOOST_TEST(committed_lows[r - 1] == 0u);
                BOOST_TEST(committed_peaks[r] > committed_lows[r - 1]);
            }
            if constexpr (page_granular) {  // exactly the pages under live blocks: a higher peak
                BOOST_TEST(committed_peaks[r] > committed_peaks[r - 1], "round " << r);
            }
        }
    }
    if constexpr (!elastic) {
        BOOST_TEST(committed_constant);
    }
    std::string rounds;
    for (std::size_t r = 0; r < block_peaks.size(); ++r) {
        rounds += " [cap " + std::to_string(caps[r]) + ": peak " + std::to_string(block_peaks[r]) + " blocks, " +
                  std::to_string(committed_peaks[r] / MiB) + " MiB -> " + std::to_string(committed_lows[r] / MiB) +
                  " MiB]";
    }
    std::printf("%s/%s: 1 graph instantiation, %zu launches, %zu sequences, %zu tokens written, %zu rows and %llu "
                "words checked, %zu wrong; committed fell after %zu steps (trims apart);%s\n",
                std::string(vmmpp::type_name<config>).c_str(), std::string(Case::layout::name).c_str(), engine.steps(),
                engine.admitted(), engine.new_tokens(), engine.rows_checked(), engine.words_checked(),
                engine.rows_wrong(), committed_falls, rounds.c_str());
}
