// Prefix caching on the GPU (vmmpp/prefix/prefix_cache.hpp), on every GPU configuration whose
// blocks can be shared (elastic, elastic_page, static) in both paged layouts (block_major,
// layer_major):
//   1. A prompt of 160 blocks written by a kernel, published, its sequence freed on s1 right
//      after a ~200 ms kernel that reads all its blocks was queued there; then every cached block
//      is evicted at once (clear) and the pool asked for everything back (trim, collect) while
//      the kernel still runs. The kernel must read every word right, the stream end with
//      cudaSuccess, and the memory stay committed until the kernel is done (then come back with
//      no call, by the release agent).
//   2. A randomized engine with prefix caching: three engine streams and the cache's own,
//      requests from a few shared system prompts and multi-turn sessions (attach the cached
//      prefix, append the rest, write it with a kernel through slot_mapping, publish, decode a
//      few steps reading every token through the block table with a kernel, free on the
//      sequence's stream right after its last launch), a tight max_cached_bytes, few blocks and
//      (elastic block_major) a budget under the span, so appends evict and trims happen all the time. Every
//      token's value is a function of its whole token history (as the block keys are), so a
//      cached block's content is checkable: every read is compared on the GPU with the host's
//      model, and check_cached() reads every cached block under its key.
//
// Environment: VMMPP_PREFIX_SMALL=1 runs a smaller variant (fewer layers, fewer words checked,
// one short seed) for compute-sanitizer memcheck; VMMPP_PREFIX_SEEDS / VMMPP_PREFIX_STEPS
// override the randomized engine's seeds (default 4, small 1) and steps (default 300, small 200).
//
// Compaction (prefix_cache moving evictable cached blocks to lower ids with a stream-ordered
// copy) is checked by calling prefix_engine::check_cached() after the move: see the comment at
// prefix_engine::maintenance(), where a compact() call goes in a few lines.
#define VMMPP_GPU_TEST_NAME "gpu prefix cache"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"
#include "support/gpu_kv.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "support/kv_factories.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/config_list.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/type_list.hpp"

using namespace vmmpp_test;

namespace {

using prefix_cases = paged_engine_cases;

bool small_variant() {
    const char* v = std::getenv("VMMPP_PREFIX_SMALL");
    return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
}
std::size_t env_or(const char* name, std::size_t fallback) {
    const char* v = std::getenv(name);
    return v != nullptr && v[0] != '\0' ? static_cast<std::size_t>(std::strtoull(v, nullptr, 10)) : fallback;
}

long long cycles_per_ms() {
    int khz = 0;
    cuda_check(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
    return khz;
}

__host__ __device__ inline std::uint32_t mix32(std::uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/// Which cache of a case, with (shared_budget configurations) a budget of `budget_bytes`.
template <class Case>
struct made_cache {
    using config = typename Case::config;
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<typename Case::cache> cache;
    made_cache(const vmmpp::kv_geometry& g, cudaStream_t stream, std::size_t budget_bytes) {
        const vmmpp::kv_cache_options options{.stream = stream};
        using growth = typename config::growth_type;
        using backing_options = typename config::backing_type::options;
        if constexpr (std::is_same_v<typename config::quota_type, vmmpp::shared_budget>) {
            budget = std::make_unique<vmmpp::budget>(budget_bytes);
            cache = std::make_unique<typename Case::cache>(g, backing_options{}, growth{},
                                                           budget->register_model("kv", budget_bytes), options);
        } else {
            cache = std::make_unique<typename Case::cache>(g, backing_options{}, growth{}, typename config::quota_type{},
                                                           options);
        }
    }
};
/// The span of `g` in `Layout`, in whole 2 MiB pages, one page more.
template <class Layout>
std::size_t span_pages_bytes(const vmmpp::kv_geometry& g) {
    return (Layout::span_bytes(g) / (2 * MiB) + 1) * (2 * MiB);
}

// ---------------------------------------------------------------------------------------------
// 1. Stream order under eviction.

/// Word `w` of piece `p` (pieces_of order) of the prompt.
__host__ __device__ inline std::uint32_t piece_word(std::uint32_t p, std::uint32_t w) {
    return mix32(p * 0x9E3779B1U + w * 0x85EBCA77U + 0x1234567U);
}

/// Writes every `stride`-th word of every piece (the words spin_then_check reads).
__global__ void write_pieces(std::uint32_t* const* pieces, int n_pieces, std::uint32_t words, std::uint32_t stride) {
    for (int p = blockIdx.x; p < n_pieces; p += gridDim.x) {
        for (std::uint32_t w = threadIdx.x * stride; w < words; w += blockDim.x * stride) {
            pieces[p][w] = piece_word(static_cast<std::uint32_t>(p), w);
        }
    }
}

struct read_totals {
    unsigned long long sum;         // of the words read
    unsigned long long checked;     // words read
    unsigned long long mismatches;  // words that differ from piece_word
};

/// Spins `cycles` (the engine's step still queued), then reads every `stride`-th word of every
/// piece: sums them, counts them and those that are not piece_word.
__global__ void spin_then_check(const std::uint32_t* const* pieces, int n_pieces, std::uint32_t words,
                                std::uint32_t stride, long long cycles, read_totals* out) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
    unsigned long long sum = 0, checked = 0, bad = 0;
    for (int p = blockIdx.x; p < n_pieces; p += gridDim.x) {
        for (std::uint32_t w = threadIdx.x * stride; w < words; w += blockDim.x * stride) {
            const std::uint32_t got = pieces[p][w];
            sum += got;
            ++checked;
            bad += got != piece_word(static_cast<std::uint32_t>(p), w) ? 1 : 0;
        }
    }
    atomicAdd(&out->sum, sum);
    atomicAdd(&out->checked, checked);
    atomicAdd(&out->mismatches, bad);
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(evicting_every_cached_block_under_a_running_reader_waits_for_it, Case, prefix_cases) {
    using config = typename Case::config;
    constexpr bool elastic = config::growth_type::is_elastic;
    const bool small = small_variant();
    // Llama-3-8B-like (small: 8 layers): a piece is 32 KiB; a block_major block is one 2 MiB page.
    const vmmpp::kv_geometry g{.layers = small ? 8U : 32U, .kv_heads = 8, .head_dim = 128,
                               .type = vmmpp::dtype::bf16, .block_tokens = 16, .max_blocks = 256};
    const std::size_t piece_bytes = std::size_t{16} * 8 * 128 * 2;
    const std::uint32_t words = piece_bytes / 4;
    const std::uint32_t stride = small ? 8 : 1;
    constexpr std::size_t prompt_blocks = 160;

    const test_stream s1, cache_stream;
    made_cache<Case> made(g, cache_stream, 2 * span_pages_bytes<typename Case::layout>(g));
    auto& c = *made.cache;
    vmmpp::prefix_cache<typename Case::cache> pc(c);

    std::mt19937_64 rng(7);
    std::vector<std::int32_t> tokens(prompt_blocks * g.block_tokens);
    for (auto& t : tokens) {
        t = static_cast<std::int32_t>(rng() % 128000);
    }
    const auto seq = c.add_sequence();
    pc.append(seq, tokens.size(), s1);
    const auto host_pieces = pieces_of(c, seq);
    BOOST_REQUIRE(host_pieces.size() == prompt_blocks * 2 * g.layers);
    const int n_pieces = static_cast<int>(host_pieces.size());

    std::uint32_t** pieces = nullptr;
    read_totals* totals = nullptr;
    cuda_check(cudaMalloc(&pieces, host_pieces.size() * sizeof(void*)));
    cuda_check(cudaMalloc(&totals, sizeof(read_totals)));
    cuda_check(cudaMemcpy(pieces, host_pieces.data(), host_pieces.size() * sizeof(void*), cudaMemcpyHostToDevice));
    cuda_check(cudaDeviceSynchronize());  // a pageable copy may return before its DMA; s1 does not wait for it
    cuda_check(cudaMemsetAsync(totals, 0, sizeof(read_totals), s1));
    write_pieces<<<264, 256, 0, s1>>>(pieces, n_pieces, words, stride);  // the prompt's prefill
    cuda_check(cudaGetLastError());
    BOOST_TEST(pc.publish(seq, tokens) == prompt_blocks);

    cudaEvent_t done = nullptr;
    cuda_check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    spin_then_check<<<264, 256, 0, s1>>>(pieces, n_pieces, words, stride, 200 * cycles_per_ms(), totals);
    cuda_check(cudaGetLastError());
    cuda_check(cudaEventRecord(done, s1));

    pc.free(seq, s1);  // the blocks stay cached, evictable: the kernel still reads them
    BOOST_TEST(pc.cached_blocks() == prompt_blocks);
    BOOST_TEST(pc.evictable_blocks() == prompt_blocks);
    const std::size_t committed_before = c.pool().committed_bytes();
    const auto evicted = pc.clear();  // everything at once, from the host
    BOOST_TEST(evicted.blocks.size() == prompt_blocks);
    BOOST_TEST(pc.cached_blocks() == 0u);
    BOOST_TEST(c.used_blocks() == 0u);
    (void)c.pool().trim();  // and the engine asks for every byte back at once
    (void)c.collect();
    const std::size_t committed_running = c.pool().committed_bytes();
    const auto awaiting_running = c.pool().stats().awaiting_gpu_units;
    const cudaError_t query = cudaEventQuery(done);
    if (query != cudaSuccess && query != cudaErrorNotReady) {
        cuda_check(query);
    }
    if (const cudaError_t last = cudaGetLastError(); last != cudaSuccess && last != cudaErrorNotReady) {
        cuda_check(last);  // (a "not ready" the query may have left is no error)
    }
    const bool still_running = query == cudaErrorNotReady;
    if (small && !still_running) {
        // Under compute-sanitizer a launch may return only once its kernel is done: nothing was
        // running to wait for, and the checks of memory under a running kernel prove nothing.
        std::printf("the reader had finished before the checks (a tool serialising launches?): "
                    "the memory-under-a-running-kernel checks are skipped\n");
    } else {
        BOOST_TEST(still_running, "the reader finished before the checks: they would prove nothing");
    }
    if (still_running) {
        if constexpr (elastic) {
            BOOST_TEST(committed_before >= prompt_blocks * pc.block_bytes());
            BOOST_TEST(committed_running >= prompt_blocks * pc.block_bytes(),
                       "memory under the running reader went back: " << committed_running << " bytes committed");
            BOOST_TEST(awaiting_running > 0u);
        } else {
            BOOST_TEST(committed_running == committed_before);
        }
    }

    cuda_check(cudaStreamSynchronize(s1));
    cuda_check(cudaGetLastError());
    read_totals got{};
    cuda_check(cudaMemcpy(&got, totals, sizeof got, cudaMemcpyDeviceToHost));
    unsigned long long want_sum = 0, want_checked = 0;
    for (std::uint32_t p = 0; p < static_cast<std::uint32_t>(n_pieces); ++p) {
        for (std::uint32_t w = 0; w < words; w += stride) {
            want_sum += piece_word(p, w);
            ++want_checked;
        }
    }
    BOOST_TEST(got.mismatches == 0u, got.mismatches << " of " << got.checked << " words read wrong");
    BOOST_TEST(got.checked == want_checked);
    BOOST_TEST(got.sum == want_sum);

    if constexpr (elastic) {
        if (still_running) {
            // Done: the release agent gives the memory back without a call (up to its spare pages).
            const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
            while (c.pool().committed_bytes() + prompt_blocks * pc.block_bytes() / 2 > committed_running &&
                   std::chrono::steady_clock::now() < give_up) {
            }
            const std::size_t committed_after = c.pool().committed_bytes();
            BOOST_TEST(committed_after + prompt_blocks * pc.block_bytes() / 2 <= committed_running,
                       "not back without a call 2 s after the reader ended: " << committed_after << " of "
                                                                              << committed_running << " bytes committed");
        }
        (void)c.pool().trim();  // and everything with one
        BOOST_TEST(c.pool().stats().awaiting_gpu_units == 0u);
        BOOST_TEST(c.pool().committed_bytes() == 0u);
    }
    std::printf("%s/%s: %zu blocks evicted under a running reader, committed %zu -> %zu (running) -> %zu bytes\n",
                std::string(vmmpp::type_name<config>).c_str(), std::string(Case::layout::name).c_str(),
                evicted.blocks.size(), committed_before, committed_running, c.pool().committed_bytes());
    (void)cudaEventDestroy(done);
    (void)cudaFree(pieces);
    (void)cudaFree(totals);
}

namespace {

// ---------------------------------------------------------------------------------------------
// 2. A randomized engine with prefix caching.

constexpr int max_parts = 64;  // layers x {K, V} the kernels address

/// Where token slots lie: layer-and-part lp's element [block, token, 0, 0] is at
/// base[lp] + block * block_stride + token * token_stride (bytes).
struct kv_addressing {
    unsigned char* base[max_parts];
    long long block_stride;
    long long token_stride;
    int parts;
    int block_tokens;
};

/// The word stored in layer-and-part lp for a token of value v (each part its own word).
__host__ __device__ inline std::uint32_t stored_word(std::uint32_t v, int lp) {
    return v ^ mix32(static_cast<std::uint32_t>(lp) + 0x51ED270BU);
}
__device__ inline std::uint32_t* slot_word(const kv_addressing& a, long long block, long long offset, int lp) {
    return reinterpret_cast<std::uint32_t*>(a.base[lp] + block * a.block_stride + offset * a.token_stride);
}

/// Writes token i's value into its slot (slot_mapping) in every layer's K and V.
__global__ void write_tokens(kv_addressing a, const std::int64_t* slots, const std::uint32_t* values, int n) {
    const int total = n * a.parts;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int t = i / a.parts, lp = i % a.parts;
        const long long slot = slots[t];
        *slot_word(a, slot / a.block_tokens, slot % a.block_tokens, lp) = stored_word(values[t], lp);
    }
}

struct check_result {
    unsigned long long mismatches;
    int first_set;
    std::uint32_t read, token, part, got, expected;
};

/// Reads tokens [0, n) through the block table in every layer's K and V and compares them with
/// `expected`; counts mismatches and keeps the first.
__global__ void read_and_check(kv_addressing a, const std::int32_t* table, const std::uint32_t* expected, int n,
                               std::uint32_t read, check_result* out) {
    const int total = n * a.parts;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int t = i / a.parts, lp = i % a.parts;
        const std::uint32_t got = *slot_word(a, table[t / a.block_tokens], t % a.block_tokens, lp);
        const std::uint32_t want = stored_word(expected[t], lp);
        if (got != want) {
            atomicAdd(&out->mismatches, 1ULL);
            if (atomicCAS(&out->first_set, 0, 1) == 0) {
                out->read = read;
                out->token = static_cast<std::uint32_t>(t);
                out->part = static_cast<std::uint32_t>(lp);
                out->got = got;
                out->expected = want;
            }
        }
    }
}

__global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

/// The value of the token after history value `h` (the value of the token before, 0 for the
/// first) and token id `token` at `position`: a function of the whole token history, as a
/// block's key is of its chain.
std::uint32_t next_value(std::uint32_t h, std::int32_t token, std::size_t position) {
    return mix32(h * 0x9E3779B1U ^ mix32(static_cast<std::uint32_t>(token) + 0x632BE5ABU) ^
                 static_cast<std::uint32_t>(position) * 0x85EBCA77U) |
           1U;
}

/// Append-only pinned host memory the kernels read their arguments from (never rewritten while
/// a kernel may still read it).
template <class T>
class pinned_arena {
public:
    explicit pinned_arena(std::size_t n) : capacity_(n) { cuda_check(cudaMallocHost(&data_, n * sizeof(T))); }
    pinned_arena(const pinned_arena&) = delete;
    pinned_arena& operator=(const pinned_arena&) = delete;
    ~pinned_arena() { (void)cudaFreeHost(data_); }
    [[nodiscard]] bool room(std::size_t n) const { return used_ + n <= capacity_; }
    T* take(std::span<const T> from) {
        BOOST_REQUIRE(room(from.size()));
        T* p = data_ + used_;
        std::copy(from.begin(), from.end(), p);
        used_ += from.size();
        return p;
    }

private:
    T* data_ = nullptr;
    std::size_t capacity_, used_ = 0;
};

struct engine_totals {
    std::size_t requests = 0, preempted = 0, decodes = 0, reads = 0, words_checked = 0, cached_checks = 0;
    std::size_t attached_tokens = 0, published = 0, host_trims = 0, evicted = 0, append_evictions = 0, moved = 0;
};

/// The randomized engine over a prefix cache. Stream rules, as an engine keeps them: a write
/// into a block is ordered after the reads before its free by append (append(seq, n, stream),
/// or append on the cache's stream followed by the engine stream waiting for it); a sequence that
/// attaches cached blocks waits for the writes of those blocks (the event recorded after each
/// write, per block); check_cached reads on the cache's stream, whose work eviction fences.
template <class Case>
class prefix_engine {
public:
    using cache_type = typename Case::cache;
    using prefix_type = vmmpp::prefix_cache<cache_type>;

    prefix_engine(cache_type& cache, prefix_type& pc, std::vector<cudaStream_t> streams, cudaStream_t cache_stream,
                  std::uint64_t seed)
        : cache_(cache), pc_(pc), streams_(std::move(streams)), cache_stream_(cache_stream), rng_(seed),
          last_write_(cache.geometry().max_blocks, nullptr), tables_(1U << 20), slots_(1U << 20),
          values_(1U << 22) {
        const auto& g = cache.geometry();
        BOOST_REQUIRE(2 * g.layers <= static_cast<std::uint32_t>(max_parts));
        addressing_.parts = static_cast<int>(2 * g.layers);
        addressing_.block_tokens = static_cast<int>(g.block_tokens);
        const vmmpp::kv_tensor k0 = cache.tensor(0, vmmpp::kv_part::key);
        const long long element = 2;  // bf16
        addressing_.block_stride = k0.strides[0] * element;
        addressing_.token_stride = k0.strides[1] * element;
        for (std::uint32_t l = 0; l < g.layers; ++l) {
            for (int p = 0; p < 2; ++p) {
                const vmmpp::kv_tensor t = cache.tensor(l, p == 0 ? vmmpp::kv_part::key : vmmpp::kv_part::value);
                BOOST_REQUIRE(t.strides[0] * element == addressing_.block_stride);
                BOOST_REQUIRE(t.strides[1] * element == addressing_.token_stride);
                addressing_.base[2 * l + p] = static_cast<unsigned char*>(t.data);
            }
        }
        cuda_check(cudaMalloc(&result_, sizeof(check_result)));
        cuda_check(cudaMemset(result_, 0, sizeof(check_result)));
        cuda_check(cudaDeviceSynchronize());  // the engine's streams do not wait for the legacy stream
        // A few shared system prompts, of lengths around and across block boundaries.
        for (std::size_t len : {48, 37, 100, 16}) {
            system_prompts_.push_back(random_tokens(len));
        }
    }
    prefix_engine(const prefix_engine&) = delete;
    prefix_engine& operator=(const prefix_engine&) = delete;
    ~prefix_engine() {
        (void)cudaDeviceSynchronize();
        for (cudaEvent_t e : events_) {
            (void)cudaEventDestroy(e);
        }
        (void)cudaFree(result_);
    }

    /// `steps` engine steps, then every request ends (freed on its stream) and every cached
    /// block is checked.
    void run(std::size_t steps) {
        const long long per_us = std::max(1LL, cycles_per_ms() / 1000);
        for (std::size_t i = 0; i < steps && values_.room(8192) && tables_.room(4096) && slots_.room(4096); ++i) {
            const int op = pick(100);
            if (live_.empty() || (op < 30 && live_.size() < 8)) {
                admit();
            } else {
                decode(std::next(live_.begin(), static_cast<std::ptrdiff_t>(pick(live_.size())))->first);
            }
            maintenance();
            // Make a random stream lag by 5-200 us of work.
            const auto us = static_cast<long long>(5 + pick(196));
            spin<<<1, 1, 0, any_stream_or_cache()>>>(us * per_us);
            cuda_check(cudaGetLastError());
        }
        while (!live_.empty()) {
            finish(live_.begin()->first);
        }
        check_cached();
    }

    /// Queues, on the cache's stream, a read of every cached block compared with the values its
    /// key says it holds. Call it after anything that moves cached blocks (compaction).
    void check_cached() {
        std::vector<std::int32_t> blocks;
        std::vector<std::uint32_t> expected;
        const std::size_t bt = cache_.geometry().block_tokens;
        pc_.for_each_cached([&](const vmmpp::block_key& key, std::int32_t block) {
            const auto it = by_key_.find(key);
            BOOST_REQUIRE(it != by_key_.end());  // every cached key was published here
            blocks.push_back(block);
            expected.insert(expected.end(), it->second.begin(), it->second.end());
            wait_write(block, cache_stream_);
        });
        BOOST_REQUIRE(expected.size() == blocks.size() * bt);
        cache_.order_reads_after_fences(blocks, cache_stream_);  // after compaction's copies, on any stream
        if (blocks.empty() || !tables_.room(blocks.size()) || !values_.room(expected.size())) {
            return;
        }
        launch_check(blocks, expected, cache_stream_);
        ++totals_.cached_checks;
    }

    /// After the GPU finished: the mismatches (0 expected) and the first one.
    check_result result() const {
        check_result r{};
        cuda_check(cudaMemcpy(&r, result_, sizeof r, cudaMemcpyDeviceToHost));
        return r;
    }
    [[nodiscard]] const engine_totals& totals() const { return totals_; }

private:
    struct request {
        cudaStream_t stream;
        std::vector<std::int32_t> tokens;
        std::vector<std::uint32_t> values;  // the model: the value each position holds
        std::size_t decodes_left;
        std::size_t session;  // index into sessions_, or sessions_.size() for a new session
    };

    std::size_t pick(std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng_); }
    cudaStream_t any_stream() { return streams_[pick(streams_.size())]; }
    cudaStream_t any_stream_or_cache() {
        const std::size_t i = pick(streams_.size() + 1);
        return i == streams_.size() ? cache_stream_ : streams_[i];
    }
    std::vector<std::int32_t> random_tokens(std::size_t n) {
        std::vector<std::int32_t> t(n);
        for (auto& x : t) {
            x = static_cast<std::int32_t>(pick(32000));
        }
        return t;
    }
    static std::vector<std::uint32_t> values_of(std::span<const std::int32_t> tokens) {
        std::vector<std::uint32_t> v(tokens.size());
        std::uint32_t h = 0;
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            h = next_value(h, tokens[i], i);
            v[i] = h;
        }
        return v;
    }

    /// `to` waits for the work queued on `from` so far.
    void order(cudaStream_t from, cudaStream_t to) {
        if (from == to) {
            return;
        }
        cudaEvent_t e = nullptr;
        cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        events_.push_back(e);
        cuda_check(cudaEventRecord(e, from));
        cuda_check(cudaStreamWaitEvent(to, e, 0));
    }
    /// `stream` waits for the last write into `block`.
    void wait_write(std::int32_t block, cudaStream_t stream) {
        if (cudaEvent_t e = last_write_.at(static_cast<std::size_t>(block)); e != nullptr) {
            cuda_check(cudaStreamWaitEvent(stream, e, 0));
        }
    }

    /// Appends `n` tokens to `seq`, through the prefix cache (which evicts when refused), on its
    /// stream or on the cache's. False when refused with nothing left to evict (the caller ends
    /// the request: preempted).
    bool append(vmmpp::seq_id seq, request& r, std::size_t n) {
        const auto evictions = pc_.stats().evictions;
        struct count_evictions {  // whether or not the append throws
            prefix_engine& e;
            std::uint64_t before;
            ~count_evictions() { e.totals_.append_evictions += e.pc_.stats().evictions - before; }
        } counted{*this, evictions};
        try {
            if (pick(2) == 0) {
                pc_.append(seq, n, r.stream);
            } else {
                order(r.stream, cache_stream_);  // a copy-on-write there would read r.stream's tokens
                pc_.append(seq, n);
                order(cache_stream_, r.stream);  // the new blocks are safe for the cache's stream
            }
            return true;
        } catch (const vmmpp::out_of_blocks&) {
        } catch (const vmmpp::over_quota&) {
        } catch (const vmmpp::out_of_memory&) {
        }
        return false;
    }

    /// Writes tokens [first, r.tokens.size()) of `seq` through slot_mapping on its stream.
    void write(vmmpp::seq_id seq, request& r, std::size_t first) {
        const std::size_t n = r.tokens.size() - first;
        if (n == 0) {
            return;
        }
        std::vector<std::int64_t> slots(n);
        cache_.slot_mapping(seq, first, slots);
        const std::int64_t* s = slots_.take(slots);
        const std::uint32_t* v = values_.take(std::span<const std::uint32_t>(r.values).subspan(first));
        const int threads = 256;
        const int grid = static_cast<int>(std::min<std::size_t>(64, (n * addressing_.parts + threads - 1) / threads));
        write_tokens<<<grid, threads, 0, r.stream>>>(addressing_, s, v, static_cast<int>(n));
        cuda_check(cudaGetLastError());
        cudaEvent_t e = nullptr;
        cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        events_.push_back(e);
        cuda_check(cudaEventRecord(e, r.stream));
        const std::size_t bt = cache_.geometry().block_tokens;
        for (const std::int64_t slot : slots) {
            last_write_.at(static_cast<std::size_t>(slot / static_cast<std::int64_t>(bt))) = e;
        }
    }

    /// Reads every token of `seq` through its block table on its stream and checks it.
    void read(vmmpp::seq_id seq, const request& r) {
        const auto table = cache_.block_table(seq);
        BOOST_REQUIRE(table.size() == cache_.geometry().blocks_for(r.tokens.size()));
        launch_check(table, r.values, r.stream);
    }
    void launch_check(std::span<const std::int32_t> table, std::span<const std::uint32_t> expected, cudaStream_t stream) {
        const std::int32_t* t = tables_.take(table);
        const std::uint32_t* e = values_.take(expected);
        const std::size_t n = expected.size();
        const int threads = 256;
        const int grid = static_cast<int>(std::min<std::size_t>(128, (n * addressing_.parts + threads - 1) / threads));
        read_and_check<<<grid, threads, 0, stream>>>(addressing_, t, e, static_cast<int>(n),
                                                     static_cast<std::uint32_t>(totals_.reads), result_);
        cuda_check(cudaGetLastError());
        ++totals_.reads;
        totals_.words_checked += n * static_cast<std::size_t>(addressing_.parts);
    }

    /// A request: a new session (a system prompt and a user turn) or the next turn of a session
    /// (its whole history and a user turn). Attaches the cached prefix, appends and writes the
    /// rest, publishes.
    void admit() {
        request r;
        r.stream = any_stream();
        r.decodes_left = 1 + pick(8);
        if (!sessions_.empty() && pick(2) == 0) {
            r.session = pick(sessions_.size());
            r.tokens = sessions_[r.session];
        } else {
            r.session = sessions_.size();
            r.tokens = system_prompts_[pick(system_prompts_.size())];
        }
        const auto user = random_tokens(1 + pick(64));
        r.tokens.insert(r.tokens.end(), user.begin(), user.end());
        r.values = values_of(r.tokens);
        ++totals_.requests;

        // As an engine that needs the last prompt token's logits: all tokens but the last.
        const std::span<const std::int32_t> lookup(r.tokens.data(), r.tokens.size() - 1);
        const std::size_t cached = pc_.lookup(lookup);
        const auto attached = pc_.attach(lookup, {}, r.stream);  // r.stream reads after any compaction copy
        BOOST_REQUIRE(attached.cached_tokens == cached);
        totals_.attached_tokens += cached;
        for (std::int32_t b : cache_.block_table(attached.seq)) {
            wait_write(b, r.stream);  // the cached blocks' writes, on whatever stream made them
        }
        if (!append(attached.seq, r, r.tokens.size() - cached)) {
            pc_.free(attached.seq, r.stream);
            ++totals_.preempted;
            return;
        }
        write(attached.seq, r, cached);
        publish(attached.seq, r);
        live_.emplace(attached.seq, std::move(r));
    }

    void publish(vmmpp::seq_id seq, const request& r) {
        totals_.published += pc_.publish(seq, r.tokens);
        const std::size_t bt = cache_.geometry().block_tokens;
        vmmpp::for_each_block_key(std::span<const std::int32_t>(r.tokens), bt, {},
                                  [&](std::size_t i, const vmmpp::block_key& k) {
                                      by_key_.try_emplace(k, r.values.begin() + static_cast<std::ptrdiff_t>(i * bt),
                                                          r.values.begin() + static_cast<std::ptrdiff_t>((i + 1) * bt));
                                      return true;
                                  });
    }

    /// A decode step: reads every token, then appends and writes one more and publishes.
    void decode(vmmpp::seq_id seq) {
        request& r = live_.at(seq);
        read(seq, r);
        ++totals_.decodes;
        if (r.decodes_left-- == 0 || r.tokens.size() >= 400) {
            finish(seq);
            return;
        }
        const std::int32_t token = static_cast<std::int32_t>(pick(32000));
        const std::uint32_t prev = r.values.empty() ? 0 : r.values.back();
        r.tokens.push_back(token);
        r.values.push_back(next_value(prev, token, r.tokens.size() - 1));
        if (!append(seq, r, 1)) {
            pc_.free(seq, r.stream);
            live_.erase(seq);
            ++totals_.preempted;
            return;
        }
        write(seq, r, r.tokens.size() - 1);
        publish(seq, r);
    }

    /// The request ends: a last read, the free on its stream right after it, its history kept
    /// for the session's next turn.
    void finish(vmmpp::seq_id seq) {
        request& r = live_.at(seq);
        read(seq, r);
        pc_.free(seq, r.stream);
        if (r.tokens.size() < 320) {
            if (r.session < sessions_.size()) {
                sessions_[r.session] = std::move(r.tokens);
            } else if (sessions_.size() < 8) {
                sessions_.push_back(std::move(r.tokens));
            } else {
                sessions_[pick(sessions_.size())] = std::move(r.tokens);
            }
        }
        live_.erase(seq);
    }

    /// What an engine does between steps, at random: evicts from the host, asks the pool for
    /// memory back, checks every cached block.
    void maintenance() {
        const int op = static_cast<int>(pick(100));
        if (op < 8) {
            totals_.evicted += pc_.trim().blocks.size();
            ++totals_.host_trims;
        } else if (op < 12) {
            totals_.evicted += pc_.evict(1 + pick(8)).blocks.size();
        } else if (op < 14) {
            totals_.evicted += pc_.evict_bytes(2 * MiB).blocks.size();
        } else if (op < 20) {
            (void)cache_.pool().trim();
            (void)cache_.collect();
        } else if (op < 23) {
            check_cached();
        } else if (op < 28) {
            // Compaction on a random stream (free and trim also compact, on their streams): the
            // moved blocks are read at their new ids by check_cached and by later attaches.
            totals_.moved += pc_.compact(any_stream_or_cache()).moved_blocks;
            check_cached();
        }
    }

    cache_type& cache_;
    prefix_type& pc_;
    std::vector<cudaStream_t> streams_;
    cudaStream_t cache_stream_;
    std::mt19937_64 rng_;
    kv_addressing addressing_{};
    std::vector<cudaEvent_t> last_write_;  // per block id: the event after its last write
    std::vector<cudaEvent_t> events_;      // every event, destroyed at the end
    pinned_arena<std::int32_t> tables_;
    pinned_arena<std::int64_t> slots_;
    pinned_arena<std::uint32_t> values_;
    check_result* result_ = nullptr;
    std::vector<std::vector<std::int32_t>> system_prompts_;
    std::vector<std::vector<std::int32_t>> sessions_;
    std::map<vmmpp::seq_id, request> live_;
    std::unordered_map<vmmpp::block_key, std::vector<std::uint32_t>, vmmpp::block_key_hash> by_key_;
    engine_totals totals_;
};

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(random_engine_with_prefix_caching_matches_the_model, Case, prefix_cases) {
    using config = typename Case::config;
    const bool small = small_variant();
    const std::size_t seeds = env_or("VMMPP_PREFIX_SEEDS", small ? 1 : 4);
    const std::size_t steps = env_or("VMMPP_PREFIX_STEPS", small ? 200 : 300);
    // 8 layers: a piece is 32 KiB, a block_major block 512 KiB (4 blocks a page: pages shared by
    // cached and live blocks); 48 blocks, so appends meet cached blocks all the time.
    constexpr vmmpp::kv_geometry g{.layers = 8, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16,
                                   .block_tokens = 16, .max_blocks = 48};
    engine_totals all;
    std::size_t evictions = 0, hits = 0, moves = 0;
    for (std::uint64_t seed = 1; seed <= seeds; ++seed) {
        const test_stream e0, e1, e2, cache_stream;
        // Elastic block_major: a budget of 3/4 of the span, so appends are refused for memory
        // too. Not in layer_major, where every block touches almost every page (a block's 16
        // pieces lie in 16 regions across the span): there the budget is the span.
        const std::size_t span = span_pages_bytes<typename Case::layout>(g);
        constexpr bool spread = std::is_same_v<typename Case::layout, vmmpp::layer_major>;
        made_cache<Case> made(g, cache_stream, spread ? span : (span / (2 * MiB) * 3 / 4) * (2 * MiB));
        auto& c = *made.cache;
        {
            vmmpp::prefix_cache<typename Case::cache> pc(c, {.max_cached_bytes = 24 * g.block_bytes()});
            {
                prefix_engine<Case> engine(c, pc, {e0, e1, e2}, cache_stream, seed);
                engine.run(steps);
                cuda_check(cudaDeviceSynchronize());
                cuda_check(cudaGetLastError());
                const check_result r = engine.result();
                BOOST_TEST(r.mismatches == 0u, "seed " << seed << ": " << r.mismatches << " words read wrong; first: read "
                                                       << r.read << " token " << r.token << " part " << r.part
                                                       << ": got " << r.got << ", expected " << r.expected);
                const engine_totals& t = engine.totals();
                const auto st = pc.stats();
                std::printf("%s/%s seed %llu: %zu requests (%zu preempted), %zu decodes, %zu reads (%zu words), "
                            "%zu cached-block checks, %zu tokens attached, %llu hits, %llu evictions (%zu by appends), %zu host trims, "
                            "%llu compaction moves\n",
                            std::string(vmmpp::type_name<config>).c_str(), std::string(Case::layout::name).c_str(),
                            static_cast<unsigned long long>(seed), t.requests, t.preempted, t.decodes, t.reads,
                            t.words_checked, t.cached_checks, t.attached_tokens,
                            static_cast<unsigned long long>(st.hits), static_cast<unsigned long long>(st.evictions),
                            t.append_evictions, t.host_trims, static_cast<unsigned long long>(st.moves));
                moves += st.moves;
                all.reads += t.reads;
                all.cached_checks += t.cached_checks;
                all.attached_tokens += t.attached_tokens;
                all.published += t.published;
                all.requests += t.requests;
                all.append_evictions += t.append_evictions;
                hits += st.hits;
                evictions += st.evictions;
            }
            BOOST_TEST(c.sequence_count() == 0u);
            (void)pc.clear();
            BOOST_TEST(c.used_blocks() == 0u);
        }
        cuda_check(cudaDeviceSynchronize());
        (void)c.pool().trim();
        if constexpr (config::growth_type::is_elastic) {
            BOOST_TEST(c.pool().committed_bytes() == 0u);
        }
    }
    // The run did what it is for: cached prefixes reused, evictions, reads checked.
    BOOST_TEST(all.requests > 0u);
    BOOST_TEST(all.reads > 0u);
    BOOST_TEST(all.cached_checks > 0u);
    BOOST_TEST(all.published > 0u);
    BOOST_TEST(hits > 0u);
    BOOST_TEST(all.attached_tokens > 0u);
    BOOST_TEST(evictions > 0u);
    // Compaction moved cached blocks, read at their new ids, where a move can empty a page: not
    // in a static pool (nothing to give back) nor in layer_major (a block's pieces lie in every
    // region, each region here within one page), where it must move none.
    constexpr bool movable = config::growth_type::is_elastic && !std::is_same_v<typename Case::layout, vmmpp::layer_major>;
    BOOST_TEST((moves > 0u) == movable);
    if (steps >= 200) {  // (a run shortened by VMMPP_PREFIX_STEPS may see none)
        BOOST_TEST(all.append_evictions > 0u);  // appends refused, cached blocks given up for them
    }
}
