// bench_kv_groups: memory per live token of models whose layers are not alike (issue 31), grouped
// (vmmpp/groups/: each group its own geometry and pool) against one unified pool sized for the
// largest element, on the same serving trace. What is measured is the memory the library commits
// (2 MiB pages of the host backing: the page size of CUDA VMM), sampled after every engine step;
// nothing is written, so it runs on any machine and the figures are the GPU's.
//
//   gemma3_like  5 sliding-window layers (window 1024) : 1 full-attention layer, Gemma 3's ratio
//                and window (4 KV heads of 128, bf16; Gemma 3 27B has 16 heads over 62 layers: the
//                bytes scale, the ratios do not). Unified: every layer keeps every token (one
//                kv_cache of 6 layers), as a pool with one KV geometry must.
//   hybrid       4 attention layers : 24 Mamba-2 layers, Nemotron-H-8B-like (8 KV heads of 128,
//                bf16; a Mamba-2 state of 128 heads x 64 x 128 bf16 + a conv state of
//                3 x (8192 + 2 x 8 x 128) bf16 per layer). Unified, vLLM's hybrid allocator's way:
//                one page size for every layer, so the attention block grows to the state's size
//                (528 tokens, a multiple of 16), and each Mamba layer's state takes one page.
//
// Two traces of 400 requests each (log-uniform lengths, seeded): chat (prompts 128-6144 tokens)
// and long (prompts 4096-32768), outputs 64-1024; continuous batching of up to 32 sequences, a whole prompt per prefill step, one token per
// decode step. Counters: bytes_per_live_token (committed bytes summed over steps / live tokens
// summed over steps), peak_committed_MiB, and for the grouped runs the ratio to unified in the
// same run (bench/results/kv-groups-*/README.md).
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/groups/kv_groups.hpp"
#include "vmmpp/kv/cache.hpp"

namespace {

using cache_t = vmmpp::kv_cache<vmmpp::host_config, vmmpp::block_major>;
using slots_t = vmmpp::state_slots<vmmpp::host_config>;

struct request {
    std::size_t prompt, output;
};
/// A trace's shape: prompt and output lengths, log-uniform between these.
struct trace_shape {
    const char* name;
    double shortest_prompt, longest_prompt, shortest_output, longest_output;
};
constexpr trace_shape chat{"chat", 128, 6144, 64, 1024};
constexpr trace_shape long_context{"long", 4096, 32768, 64, 1024};
constexpr std::size_t max_batch = 32;
constexpr std::size_t longest = 32768 + 1024;

std::vector<request> trace(const trace_shape& shape, std::size_t n = 400) {
    std::mt19937_64 rng(31);
    auto log_uniform = [&](double lo, double hi) {
        return static_cast<std::size_t>(std::exp(std::uniform_real_distribution<double>(std::log(lo), std::log(hi))(rng)));
    };
    std::vector<request> r(n);
    for (auto& q : r) {
        q = {log_uniform(shape.shortest_prompt, shape.longest_prompt),
             log_uniform(shape.shortest_output, shape.longest_output)};
    }
    return r;
}

/// The bytes of a cache's live blocks (no page rounding).
std::size_t block_bytes(const cache_t& c) { return c.used_blocks() * c.geometry().block_bytes(); }

/// Runs the trace through `model` (a kv_groups), sampling `committed()` (the pools' committed
/// bytes) and `live()` (the bytes of the live blocks and slots themselves) after every step.
template <class Groups, class Committed, class Live>
void serve(benchmark::State& state, const trace_shape& shape, Groups& model, Committed committed, Live live_bytes) {
    const auto requests = trace(shape);
    struct live_request {
        vmmpp::seq_id seq;
        std::size_t left;
    };
    std::vector<live_request> live;
    std::size_t next = 0;
    double byte_steps = 0, live_steps = 0, token_steps = 0;
    std::size_t peak = 0;
    while (next < requests.size() || !live.empty()) {
        while (live.size() < max_batch && next < requests.size()) {  // prefill
            const auto seq = model.add_sequence(nullptr);
            model.append(seq, requests[next].prompt, nullptr);
            live.push_back({seq, requests[next].output});
            ++next;
        }
        std::size_t tokens = 0;
        for (auto& r : live) {  // decode
            model.append(r.seq, 1, nullptr);
            --r.left;
            tokens += model.tokens(r.seq);
        }
        const std::size_t bytes = committed();
        byte_steps += static_cast<double>(bytes);
        live_steps += static_cast<double>(live_bytes());
        token_steps += static_cast<double>(tokens);
        peak = std::max(peak, bytes);
        std::erase_if(live, [&](const live_request& r) {
            if (r.left == 0) model.free(r.seq, nullptr);
            return r.left == 0;
        });
    }
    state.counters["bytes_per_live_token"] = byte_steps / token_steps;
    state.counters["block_bytes_per_live_token"] = live_steps / token_steps;  // without page rounding
    state.counters["peak_committed_MiB"] = static_cast<double>(peak) / (1 << 20);
}

/// Bytes per live token of the unified runs, for the grouped runs' ratio (the unified run of
/// each model is registered first).
std::map<std::string, double> unified_bytes_per_token;

void record_or_compare(benchmark::State& state, std::string model, const trace_shape& shape, bool unified) {
    model += shape.name;
    const double b = state.counters["bytes_per_live_token"];
    if (unified) {
        unified_bytes_per_token[model] = b;
    } else if (unified_bytes_per_token.contains(model)) {
        state.counters["vs_unified"] = b / unified_bytes_per_token[model];
    }
}

// --- Gemma 3-like: 5 sliding (window 1024) : 1 full ---

constexpr std::size_t gemma_window = 1024;
vmmpp::kv_geometry gemma_layers(std::uint32_t layers) {
    return {.layers = layers, .kv_heads = 4, .head_dim = 128, .type = vmmpp::dtype::bf16, .block_tokens = 16,
            .max_blocks = static_cast<std::uint32_t>(max_batch * longest / 16 + 64)};
}

void gemma3_like_unified(benchmark::State& state, const trace_shape& shape) {
    for (auto _ : state) {
        cache_t all(gemma_layers(6));
        vmmpp::attention_group<cache_t> every(all);
        vmmpp::kv_groups model(every);
        serve(state, shape, model, [&] { return all.pool().committed_bytes(); }, [&] { return block_bytes(all); });
    }
    record_or_compare(state, "gemma3_like", shape, true);
}

void gemma3_like_grouped(benchmark::State& state, const trace_shape& shape) {
    for (auto _ : state) {
        cache_t local(gemma_layers(5)), global(gemma_layers(1));
        vmmpp::window_group<cache_t> sliding(local, gemma_window);
        vmmpp::attention_group<cache_t> full(global);
        vmmpp::kv_groups model(sliding, full);
        serve(state, shape, model, [&] { return local.pool().committed_bytes() + global.pool().committed_bytes(); },
              [&] { return block_bytes(local) + block_bytes(global); });
    }
    record_or_compare(state, "gemma3_like", shape, false);
}

// --- hybrid: 4 attention : 24 Mamba-2 ---

constexpr std::size_t mamba_layers = 24;
constexpr std::size_t mamba_state_bytes = 128 * 64 * 128 * 2 + 3 * (8192 + 2 * 8 * 128) * 2;  // per layer
constexpr std::size_t attention_token_bytes = 2 * 8 * 128 * 2;                                // per layer
/// vLLM's unified page: the attention block grows (in multiples of 16 tokens) until a layer's
/// block holds a Mamba layer's state.
constexpr std::uint32_t unified_block_tokens =
    static_cast<std::uint32_t>((mamba_state_bytes + attention_token_bytes * 16 - 1) / (attention_token_bytes * 16) * 16);

vmmpp::kv_geometry hybrid_attention(std::uint32_t block_tokens) {
    return {.layers = 4, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16, .block_tokens = block_tokens,
            .max_blocks = static_cast<std::uint32_t>(max_batch * (longest / block_tokens + 2))};
}

template <std::uint32_t BlockTokens, std::size_t StateBytes>
void hybrid(benchmark::State& state, const trace_shape& shape) {
    for (auto _ : state) {
        cache_t attention(hybrid_attention(BlockTokens));
        slots_t states(StateBytes, max_batch + 1);
        vmmpp::attention_group<cache_t> full(attention);
        vmmpp::state_group<slots_t> ssm(states);
        vmmpp::kv_groups model(full, ssm);
        serve(state, shape, model, [&] { return attention.pool().committed_bytes() + states.pool().committed_bytes(); },
              [&] { return block_bytes(attention) + states.used_slots() * states.slot_bytes(); });
    }
    record_or_compare(state, "hybrid", shape, BlockTokens != 16);
}

[[maybe_unused]] const bool registered = [] {
    constexpr std::size_t unified_page = std::size_t{unified_block_tokens} * attention_token_bytes;
    for (const trace_shape* shape : {&chat, &long_context}) {
        const std::string trace_name = std::string("/") + shape->name;
        auto add = [&](const std::string& name, void (*run)(benchmark::State&, const trace_shape&)) {
            benchmark::RegisterBenchmark(("kv_groups/" + name + trace_name).c_str(), run, *shape)->Iterations(1);
        };
        add("gemma3_like/unified", gemma3_like_unified);
        add("gemma3_like/grouped", gemma3_like_grouped);
        add("hybrid/unified", hybrid<unified_block_tokens, mamba_layers * unified_page>);
        add("hybrid/grouped", hybrid<16, mamba_layers * mamba_state_bytes>);
    }
    return true;
}();

}  // namespace

int main(int argc, char** argv) { return vmmpp_bench::run_benchmarks(argc, argv); }
