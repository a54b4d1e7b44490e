// bench/multi_model/models.hpp: the simulated models: a KV geometry each (what the memory
// experiment is about) and a step-time model (what only sets the pace: no kernel runs).
//
// Model i of a trace is kind i % 3: 1B-like, 8B-like, 70B-like, so N = 2, 4, 8 models mix sizes.
//
// Step time, per model, in microseconds (one engine step = one batch: the prompts admitted at its
// start are prefilled, every request already running decodes one token):
//
//   step = base + prefill_tokens * prefill_per_token + running * decode_per_running
//
// The constants are a rough H100-like roofline, not measurements (P = parameters, bf16 weights):
//   base               = weight read per step: 2P bytes / 3 TB/s
//   prefill_per_token  = 2P FLOP / 400 TFLOP/s (dense bf16 at a realistic fraction of peak)
//   decode_per_running = reading ~1,000 tokens of that sequence's KV at 3 TB/s
// A 70B model does not fit one H100 (140 GB of weights); the 70B-like model is here for its KV
// geometry, and its compute is what one GPU would take if it did. Each model has its own compute
// timeline (as if MPS or green contexts split the SMs): models contend for memory only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vmmpp/kv/geometry.hpp"

namespace multi_model {

/// Microseconds of one step's parts.
struct step_cost {
    double base_us;
    double prefill_per_token_us;
    double decode_per_running_us;

    [[nodiscard]] double step_us(std::uint64_t prefill_tokens, std::size_t decoding) const noexcept {
        return base_us + static_cast<double>(prefill_tokens) * prefill_per_token_us +
               static_cast<double>(decoding) * decode_per_running_us;
    }
};

/// One kind of model: its KV shape and its step cost.
struct model_kind {
    const char* name;
    std::uint32_t layers;
    std::uint32_t kv_heads;
    std::uint32_t head_dim;
    step_cost cost;
};

inline constexpr model_kind model_kinds[] = {
    //  name   layers heads dim   base     prefill/token  decode/running
    {"1B", 16, 8, 64, {800.0, 6.0, 10.0}},       // ~1.2B params: KV 32 KiB/token, 512 KiB/block
    {"8B", 32, 8, 128, {5'300.0, 40.0, 40.0}},   // Llama-3-8B-like: 128 KiB/token, 2 MiB/block
    {"70B", 80, 8, 128, {46'700.0, 350.0, 100.0}},  // Llama-3-70B-like: 320 KiB/token, 5 MiB/block
};

inline constexpr std::uint32_t block_tokens = 16;
inline constexpr vmmpp::dtype kv_type = vmmpp::dtype::bf16;

/// A model of the run: its name ("m2-70B"), kind, and KV geometry without max_blocks (each cache
/// sets its own: the slice or the budget decides it).
struct model_spec {
    std::string name;
    const model_kind* kind;
    vmmpp::kv_geometry geometry;

    /// Bytes of one KV block (every layer, K and V).
    [[nodiscard]] std::size_t block_bytes() const noexcept { return geometry.block_bytes(); }
    /// The geometry of a cache that holds at most `bytes` of blocks.
    [[nodiscard]] vmmpp::kv_geometry geometry_for(std::size_t bytes) const {
        vmmpp::kv_geometry g = geometry;
        g.max_blocks = static_cast<std::uint32_t>(bytes / block_bytes());
        return g;
    }
};

/// The N models of a run: kinds cycle 1B, 8B, 70B.
inline std::vector<model_spec> make_models(std::uint32_t n) {
    std::vector<model_spec> models;
    for (std::uint32_t i = 0; i < n; ++i) {
        const model_kind& k = model_kinds[i % std::size(model_kinds)];
        models.push_back({"m" + std::to_string(i) + "-" + k.name, &k,
                          vmmpp::kv_geometry{.layers = k.layers, .kv_heads = k.kv_heads, .head_dim = k.head_dim,
                                             .type = kv_type, .block_tokens = block_tokens, .max_blocks = 0}});
    }
    return models;
}

} // namespace multi_model
