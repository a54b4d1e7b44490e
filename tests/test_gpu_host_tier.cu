// The host tier on the GPU (vmmpp/tier/host_tier.hpp), over elastic_config and static_config in
// both paged layouts, with a pinned_host_config store:
//   1. A prompt written by a kernel queued behind a ~50 ms kernel on the engine's stream, freed
//      there right after, and evicted at once into the tier: the tier's copy must wait for the
//      write (every word read back right after attach on another stream), and the GPU memory
//      goes back only after the copy.
//   2. A sequence swapped out right after its last write was queued, swapped in on another
//      stream and read there: every word right.
//   3. A randomized engine on two streams (requests over shared system prompts, a few blocks of
//      their own, frees right after the last launch, evictions into a small tier, swaps out and
//      in), each block's words a function of its content (its key, or its sequence for the
//      blocks of its own), checked by a kernel on the stream that reads it.
#define VMMPP_GPU_TEST_NAME "gpu host tier"
#include "support/gpu_main.hpp"
#include "support/gpu.hpp"

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <type_traits>
#include <random>
#include <span>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/kv/blocks_contiguous.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/tier/host_tier.hpp"

using namespace vmmpp_test;

namespace {

constexpr vmmpp::kv_geometry geom{.layers = 4, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::bf16,
                                  .block_tokens = 16, .max_blocks = 256};

__global__ void fill_words(std::byte* p, std::size_t bytes, unsigned value) {
    auto* w = reinterpret_cast<unsigned*>(p);
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < bytes / 4; i += std::size_t{gridDim.x} * blockDim.x) {
        w[i] = value ^ static_cast<unsigned>(i);
    }
}
__global__ void count_wrong(const std::byte* p, std::size_t bytes, unsigned value, unsigned long long* bad) {
    const auto* w = reinterpret_cast<const unsigned*>(p);
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < bytes / 4; i += std::size_t{gridDim.x} * blockDim.x) {
        if (w[i] != (value ^ static_cast<unsigned>(i))) {
            atomicAdd(bad, 1ull);
        }
    }
}
__global__ void spin(unsigned long long ns) {
    const unsigned long long start = clock64();
    while (static_cast<unsigned long long>(clock64() - start) < ns * 2) {  // ~2 GHz: ns at least
    }
}

/// A typed case: the GPU configuration and layout.
template <class Config, class Layout>
struct tier_case {
    using config = Config;
    using cache_t = vmmpp::kv_cache<Config, Layout>;
    using prefix_t = vmmpp::prefix_cache<cache_t>;
    using tier_t = vmmpp::host_tier<prefix_t>;
};
using tier_cases = std::tuple<tier_case<vmmpp::elastic_config, vmmpp::block_major>,
                              tier_case<vmmpp::elastic_config, vmmpp::layer_major>,
                              tier_case<vmmpp::static_config, vmmpp::block_major>,
                              tier_case<vmmpp::static_config, vmmpp::layer_major>>;

struct streams {
    cudaStream_t engine = nullptr, reader = nullptr, tier = nullptr;
    streams() {
        int low = 0, high = 0;
        cuda_check(cudaDeviceGetStreamPriorityRange(&low, &high));
        cuda_check(cudaStreamCreateWithFlags(&engine, cudaStreamNonBlocking));
        cuda_check(cudaStreamCreateWithFlags(&reader, cudaStreamNonBlocking));
        cuda_check(cudaStreamCreateWithPriority(&tier, cudaStreamNonBlocking, low));
    }
    ~streams() {
        (void)cudaStreamSynchronize(engine);
        (void)cudaStreamSynchronize(reader);
        (void)cudaStreamSynchronize(tier);
        (void)cudaStreamDestroy(engine);
        (void)cudaStreamDestroy(reader);
        (void)cudaStreamDestroy(tier);
    }
};

/// Every K and V piece of `block`: calls f(address, bytes).
template <class Cache, class F>
void for_each_piece(const Cache& c, std::int32_t block, F&& f) {
    const std::size_t bytes = c.geometry().block_tensor_bytes();
    for (std::uint32_t l = 0; l < c.geometry().layers; ++l) {
        f(c.key(l, block), bytes);
        f(c.value(l, block), bytes);
    }
}
template <class Cache>
void write_block(const Cache& c, std::int32_t block, unsigned value, cudaStream_t s) {
    unsigned salt = 0;
    for_each_piece(c, block, [&](std::byte* p, std::size_t bytes) { fill_words<<<8, 256, 0, s>>>(p, bytes, value + 977 * salt++); });
    cuda_check(cudaGetLastError());
}
/// Queues a check of `block` on `s`, adding wrong words to *bad.
template <class Cache>
void check_block(const Cache& c, std::int32_t block, unsigned value, cudaStream_t s, unsigned long long* bad) {
    unsigned salt = 0;
    for_each_piece(c, block, [&](std::byte* p, std::size_t bytes) { count_wrong<<<8, 256, 0, s>>>(p, bytes, value + 977 * salt++, bad); });
    cuda_check(cudaGetLastError());
}

/// A device counter of wrong words.
struct wrong_words {
    unsigned long long* d = nullptr;
    wrong_words() {
        cuda_check(cudaMalloc(&d, sizeof(*d)));
        cuda_check(cudaMemset(d, 0, sizeof(*d)));
    }
    ~wrong_words() { (void)cudaFree(d); }
    unsigned long long read() const {
        unsigned long long h = 0;
        cuda_check(cudaDeviceSynchronize());
        cuda_check(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost));
        return h;
    }
};

template <class Case>
struct rig {
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<typename Case::cache_t> cache;
    std::unique_ptr<typename Case::prefix_t> prefix;
    streams s;
    std::unique_ptr<typename Case::tier_t> tier;
    explicit rig(std::size_t host_blocks, vmmpp::prefix_cache_options po = {}) {
        using cfg = typename Case::config;
        if constexpr (std::is_same_v<typename cfg::quota_type, vmmpp::shared_budget>) {
            budget = std::make_unique<vmmpp::budget>(GiB);
            cache = std::make_unique<typename Case::cache_t>(geom, typename cfg::backing_type::options{},
                                                             typename cfg::growth_type{}, budget->register_model("kv", GiB));
        } else {
            cache = std::make_unique<typename Case::cache_t>(geom);
        }
        prefix = std::make_unique<typename Case::prefix_t>(*cache, po);
        tier = std::make_unique<typename Case::tier_t>(*prefix, vmmpp::host_tier_options{.max_blocks = host_blocks, .stream = s.tier});
    }
};

std::vector<std::int32_t> prompt(std::size_t blocks, std::int32_t first) {
    std::vector<std::int32_t> t(blocks * geom.block_tokens);
    for (std::size_t i = 0; i < t.size(); ++i) {
        t[i] = first + static_cast<std::int32_t>(i);
    }
    return t;
}

} // namespace

BOOST_FIXTURE_TEST_SUITE(gpu_host_tier, needs_gpu)

BOOST_AUTO_TEST_CASE_TEMPLATE(an_evicted_prompt_is_copied_after_its_queued_write, Case, tier_cases) {
    rig<Case> r(64);
    auto& c = *r.cache;
    const auto tokens = prompt(40, 11);
    const auto t = r.tier->attach(tokens, {}, r.s.engine);
    r.prefix->append(t.seq, tokens.size(), r.s.engine);
    r.prefix->publish(t.seq, tokens);
    const std::vector<std::int32_t> blocks(c.block_table(t.seq).begin(), c.block_table(t.seq).end());
    spin<<<1, 1, 0, r.s.engine>>>(50'000'000);  // ~50 ms before the write
    for (std::size_t i = 0; i < blocks.size(); ++i) {
        write_block(c, blocks[i], 0x1000u + static_cast<unsigned>(i), r.s.engine);
    }
    r.prefix->free(t.seq, r.s.engine);  // right after the last launch
    BOOST_TEST(r.prefix->clear().blocks.size() == 40u);  // evicted into the tier while the write waits
    (void)c.collect();
    BOOST_TEST(r.tier->stats().offloaded_blocks == 40u);

    const auto back = r.tier->attach(tokens, {}, r.s.reader);
    BOOST_TEST(back.host_tokens == tokens.size());
    wrong_words bad;
    const auto table = c.block_table(back.seq);
    for (std::size_t i = 0; i < table.size(); ++i) {
        check_block(c, table[i], 0x1000u + static_cast<unsigned>(i), r.s.reader, bad.d);
    }
    BOOST_TEST(bad.read() == 0u);
    r.prefix->free(back.seq, r.s.reader);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(a_sequence_swapped_right_after_its_write_comes_back_whole, Case, tier_cases) {
    rig<Case> r(64);
    auto& c = *r.cache;
    const vmmpp::seq_id s = c.add_sequence();
    r.prefix->append(s, 30 * 16 + 5, r.s.engine);
    const std::vector<std::int32_t> blocks(c.block_table(s).begin(), c.block_table(s).end());
    spin<<<1, 1, 0, r.s.engine>>>(50'000'000);
    for (std::size_t i = 0; i < blocks.size(); ++i) {
        write_block(c, blocks[i], 0x7000u + static_cast<unsigned>(i), r.s.engine);
    }
    const std::uint64_t id = r.tier->swap_out(s, r.s.engine);
    const vmmpp::seq_id back = r.tier->swap_in(id, r.s.reader);
    BOOST_TEST(c.tokens(back) == 30u * 16 + 5);
    wrong_words bad;
    const auto table = c.block_table(back);
    for (std::size_t i = 0; i < table.size(); ++i) {
        check_block(c, table[i], 0x7000u + static_cast<unsigned>(i), r.s.reader, bad.d);
    }
    BOOST_TEST(bad.read() == 0u);
    r.prefix->free(back, r.s.reader);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(a_randomized_engine_on_two_streams_reads_every_block_right, Case, tier_cases) {
    rig<Case> r(48, {.max_cached_bytes = 24 * geom.block_bytes()});
    auto& c = *r.cache;
    std::mt19937 rng(7);
    const cudaStream_t engine[2] = {r.s.engine, r.s.reader};
    std::vector<std::vector<std::int32_t>> heads;
    for (int h = 0; h < 6; ++h) {
        heads.push_back(prompt(4 + h % 3, 100000 * (h + 1)));
    }
    struct live_seq {
        cudaStream_t stream;
        std::vector<unsigned> values;  // each block's value
    };
    std::map<vmmpp::seq_id, live_seq> live;
    std::map<std::uint64_t, live_seq> swapped;
    wrong_words bad;
    auto key_value = [](const vmmpp::block_key& k) { return static_cast<unsigned>(k.lo ^ (k.hi >> 7)); };
    auto check_all = [&](vmmpp::seq_id s, const live_seq& l) {
        const auto table = c.block_table(s);
        for (std::size_t i = 0; i < table.size(); ++i) {
            check_block(c, table[i], l.values[i], l.stream, bad.d);
        }
    };
    std::uint32_t own = 1;
    cudaEvent_t written = nullptr;
    cuda_check(cudaEventCreateWithFlags(&written, cudaEventDisableTiming));
    for (int step = 0; step < 400; ++step) {
        const unsigned op = rng() % 10;
        const cudaStream_t st = engine[rng() % 2];
        if (op < 4) {
            const auto& head = heads[rng() % heads.size()];
            const auto t = r.tier->attach(head, {}, st);
            live_seq l{st, {}};
            std::vector<vmmpp::block_key> keys;
            vmmpp::for_each_block_key(std::span<const std::int32_t>(head), geom.block_tokens, {}, [&](std::size_t, const vmmpp::block_key& k) {
                keys.push_back(k);
                return true;
            });
            try {
                r.prefix->append(t.seq, head.size() - t.cached_tokens + 16 * (1 + rng() % 3), st);
            } catch (const vmmpp::error&) {
                r.prefix->free(t.seq, st);
                continue;
            }
            const auto table = c.block_table(t.seq);
            for (std::size_t i = 0; i < table.size(); ++i) {
                l.values.push_back(i < keys.size() ? key_value(keys[i]) : 0x40000000u + own++);
                if (i >= t.cached_tokens / geom.block_tokens) {
                    write_block(c, table[i], l.values[i], st);
                }
            }
            // The other stream may attach these blocks next: it waits for the writes, as an
            // engine orders its steps (the prefix cache does not know who wrote a block).
            cuda_check(cudaEventRecord(written, st));
            cuda_check(cudaStreamWaitEvent(engine[0] == st ? engine[1] : engine[0], written, 0));
            r.prefix->publish(t.seq, head);
            check_all(t.seq, l);
            live.emplace(t.seq, std::move(l));
        } else if (op < 7 && !live.empty()) {
            auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rng() % live.size()));
            check_all(it->first, it->second);
            r.prefix->free(it->first, it->second.stream);  // right after the last launch
            live.erase(it);
        } else if (op < 8 && !live.empty()) {
            auto it = std::next(live.begin(), static_cast<std::ptrdiff_t>(rng() % live.size()));
            try {
                swapped.emplace(r.tier->swap_out(it->first, it->second.stream), it->second);
                live.erase(it);
            } catch (const vmmpp::tier_full&) {
            }
        } else if (op < 9 && !swapped.empty()) {
            auto it = std::next(swapped.begin(), static_cast<std::ptrdiff_t>(rng() % swapped.size()));
            try {
                live_seq l = it->second;
                l.stream = st;
                const vmmpp::seq_id s = r.tier->swap_in(it->first, st);
                check_all(s, l);
                live.emplace(s, std::move(l));
                swapped.erase(it);
            } catch (const vmmpp::error&) {
            }
        } else {
            (void)r.prefix->evict(1 + rng() % 4);
        }
    }
    for (const auto& [s, l] : live) {
        check_all(s, l);
    }
    BOOST_TEST(bad.read() == 0u);
    (void)cudaEventDestroy(written);
    const auto st = r.tier->stats();
    BOOST_TEST_MESSAGE("offloaded " << st.offloaded_blocks << ", loaded " << st.loaded_blocks << ", swapped in "
                                    << st.swapped_in << ", evicted " << st.evicted_blocks);
    BOOST_TEST(st.offloaded_blocks > 0u);
    BOOST_TEST(st.loaded_blocks > 0u);
    BOOST_TEST(st.swapped_in > 0u);
    BOOST_TEST(cudaStreamSynchronize(r.s.tier) == cudaSuccess);
}

// The staged path on its own: 100 scattered layer_major blocks (two chunks of 64) to whole
// page-locked host blocks and back into other GPU blocks, in reverse order: every word arrives.
BOOST_AUTO_TEST_CASE(staged_copies_of_scattered_layer_major_blocks_come_back_whole) {
    using gpu_t = vmmpp::kv_cache<vmmpp::elastic_config, vmmpp::layer_major>;
    using host_t = vmmpp::kv_cache<vmmpp::pinned_host_config, vmmpp::blocks_contiguous<vmmpp::layer_major>>;
    constexpr std::size_t n = 100;
    vmmpp::kv_geometry g = geom;
    g.max_blocks = 4 * n;
    vmmpp::budget budget{GiB};
    gpu_t gpu{g, {}, {}, budget.register_model("kv", GiB)};
    host_t host{g};
    streams s;
    std::vector<std::int32_t> all, src, dst, host_blocks;
    for (std::size_t i = 0; i < 4 * n; ++i) {
        all.push_back(gpu.take_block(s.engine));
    }
    for (std::size_t i = 0; i < n; ++i) {
        src.push_back(all[4 * i]);      // every fourth id: no two adjacent
        dst.push_back(all[4 * i + 2]);
        host_blocks.push_back(host.take_block(nullptr));
        write_block(gpu, src.back(), 0x5000u + static_cast<unsigned>(i), s.engine);
    }
    cuda_check(cudaStreamSynchronize(s.engine));
    vmmpp::copy_blocks(gpu, std::span<const std::int32_t>(src), host, std::span<const std::int32_t>(host_blocks), s.tier);
    std::vector<std::int32_t> back(host_blocks.rbegin(), host_blocks.rend());
    vmmpp::copy_blocks(host, std::span<const std::int32_t>(back), gpu, std::span<const std::int32_t>(dst), s.tier);
    cuda_check(cudaStreamSynchronize(s.tier));
    wrong_words bad;
    for (std::size_t i = 0; i < n; ++i) {
        check_block(gpu, dst[i], 0x5000u + static_cast<unsigned>(n - 1 - i), s.reader, bad.d);
    }
    BOOST_TEST(bad.read() == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
