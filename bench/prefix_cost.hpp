// bench/prefix_cost.hpp: what vmmpp::prefix_cache costs per block against the 2 MiB take (issue 29,
// "Cost"), one code path for every configuration: bench_prefix_cost.cpp registers host_config (CI's
// build), bench_prefix_cost_gpu.cpp the GPU configurations (static_config, elastic_config,
// elastic_page_config). No range-v3 here (kv/views.hpp is not included), so a .cu may include it.
//
// Geometry: Llama-3-8B-like, 32 layers, 8 KV heads of 128, bf16, 16-token blocks: 2 MiB a block
// (block_major: one block a 2 MiB page; layer_major: 64 pieces of 32 KiB, a page of each
// (layer, K/V) region holding 64 blocks' pieces). max_blocks is the benchmark's argument.
//
// Every time is the host side, what the engine's thread pays: GPU work (compaction's copies,
// release of memory behind fences) is queued, not waited for, except where a counter says sync.
//
// Per (config, layout, max_blocks):
//   take/fresh_page    kv_cache::append of one block whose pages are not committed (spare 0, one
//                      page per commit): the 2 MiB take (commit + map on elastic; for layer_major
//                      a block's first pieces commit 64 pages, one per region). fresh_fraction:
//                      the share of appends whose committed bytes grew; take_ns is the median
//                      of those (of all where none grew: static_config, committed for good).
//   take/committed     kv_cache::append of one block on committed pages (64 spare pages kept).
//   lookup, attach     of a cached 2,048-token prompt (128 blocks), per block.
//   publish            of a 2,048-token sequence (128 new keys), per block.
//   free_prefix        prefix_cache::free of a sequence attached to the cached prompt (its blocks
//                      stay cached): per free and per block; free_plain: kv_cache::free of the
//                      same sequence (what a free costs without prefix caching), same counters.
//   evict1             evict(1), 128 times over the cached prompt's blocks, per block.
//   trim               trim() evicting 128 blocks over the bound (bound 0), compaction included.
//   evict1_deep        evict(1), 128 times a round, with max_blocks / 2 blocks cached and
//                      evictable (at most half the budget's blocks; a new 128-block prompt
//                      cached each round, untimed): the cost of
//                      one eviction where many blocks are evictable, per block (evict1 has 128).
//   compact            compact() over 16 live blocks, 48 holes above them and 48 cached blocks
//                      above those (ids 64-111), per block moved (moved_per_call: 48 in
//                      layer_major, where the holes share pages with the live blocks and the
//                      cached blocks' pages empty; 0 in block_major at 2 MiB blocks, one block a
//                      page: a move would empty one page and fill another); sync_ns_per_block:
//                      the stream synchronise after it (the GPU copies); ns_per_call: the call
//                      (the plan's cost where nothing moves).
// Counters: ns_per_block (or ns_per_free), take_ns and committed_ns (the baselines of the same
// subject, medians), vs_take and vs_committed (ns per block over them).
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/quota/shared_budget.hpp"

namespace prefix_cost {

using clock_type = std::chrono::steady_clock;
using tokens_t = std::vector<std::int32_t>;
constexpr std::size_t prompt_tokens = 2048;
constexpr std::size_t prompt_blocks = prompt_tokens / 16;
/// Benchmarks skipped by an error (main returns 1 when any was).
inline int errors = 0;

inline vmmpp::kv_geometry geometry(std::uint32_t max_blocks) {
    return {.layers = 32, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16, .block_tokens = 16,
            .max_blocks = max_blocks};
}

inline double ns(clock_type::duration d) { return std::chrono::duration<double, std::nano>(d).count(); }

inline tokens_t random_tokens(std::mt19937_64& rng, std::size_t n) {
    std::uniform_int_distribution<std::int32_t> tok(0, 127999);
    tokens_t t(n);
    for (auto& x : t) {
        x = tok(rng);
    }
    return t;
}

template <class Config>
constexpr bool on_device = !std::is_same_v<Config, vmmpp::host_config>;

/// The growth policy with `spare` idle pages kept and one page per commit (no extents).
template <class Config>
typename Config::growth_type growth(std::size_t spare) {
    using G = typename Config::growth_type;
    if constexpr (std::is_same_v<G, vmmpp::adaptive_extents>) {
        return G{.fast_growth_bytes_per_second = 0, .spare_pages = spare};
    } else if constexpr (std::is_same_v<G, vmmpp::page_granular>) {
        return G{.spare_pages = spare};
    } else {
        return G{};
    }
}

/// A kv_cache (and the budget a shared_budget quota needs) and a prefix cache over it.
/// The shared budget of the elastic subjects: what a 16 GiB slice of a GPU would be.
constexpr std::size_t budget_bytes = std::size_t{16} << 30;

template <class Config, class Layout>
struct subject {
    using cache_type = vmmpp::kv_cache<Config, Layout>;
    using prefix_type = vmmpp::prefix_cache<cache_type>;
    std::unique_ptr<vmmpp::budget> budget;
    std::unique_ptr<cache_type> cache;
    std::unique_ptr<prefix_type> pc;

    /// `spare`: idle pages kept (-1: the configuration's default growth).
    subject(std::uint32_t max_blocks, long spare = -1, vmmpp::prefix_cache_options options = {}) {
        const vmmpp::kv_geometry g = geometry(max_blocks);
        const auto grow = spare < 0 ? typename Config::growth_type{} : growth<Config>(static_cast<std::size_t>(spare));
        if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
            budget = std::make_unique<vmmpp::budget>(budget_bytes);
            cache = std::make_unique<cache_type>(g, typename Config::backing_type::options{}, grow,
                                                 budget->register_model("prefix_cost", budget_bytes));
        } else {
            cache = std::make_unique<cache_type>(g, typename Config::backing_type::options{}, grow);
        }
        pc = std::make_unique<prefix_type>(*cache, options);
    }
    void sync() {
        if constexpr (on_device<Config>) {
            (void)cudaStreamSynchronize(cache->stream());
        }
    }
    /// `tokens` cached and evictable (appended, published, freed by kv_cache::free).
    void cache_prompt(const tokens_t& tokens) {
        const auto seq = cache->add_sequence();
        cache->append(seq, tokens.size());
        pc->publish(seq, tokens);
        cache->free(seq);
    }
};

template <class Config, class Layout>
struct baseline {
    double take_ns = 0, committed_ns = 0, fresh_fraction = 0;
};

/// The two appends of one block: on fresh pages (spare 0) and on committed pages (spare 64).
/// Medians of `rounds`.
template <class Config, class Layout>
baseline<Config, Layout> measure_baseline(std::uint32_t max_blocks, int rounds) {
    baseline<Config, Layout> b;
    {
        subject<Config, Layout> s(max_blocks, 0);
        auto& c = *s.cache;
        std::vector<double> t, t_fresh;
        for (int r = 0; r < rounds + 3; ++r) {
            const auto seq = c.add_sequence();
            const std::size_t before = c.pool().committed_bytes();
            const auto start = clock_type::now();
            c.append(seq, 16);
            const auto d = clock_type::now() - start;
            const bool grew = c.pool().committed_bytes() > before;
            c.free(seq);
            s.sync();
            if (r >= 3) {
                t.push_back(ns(d));
                if (grew) {
                    t_fresh.push_back(ns(d));
                }
            }
        }
        // The median of the appends that did commit (a release still behind its fence leaves
        // the page committed for the next one); of all where none did (static_config).
        auto& use = t_fresh.empty() ? t : t_fresh;
        std::sort(use.begin(), use.end());
        b.take_ns = use[use.size() / 2];
        b.fresh_fraction = static_cast<double>(t_fresh.size()) / static_cast<double>(rounds);
    }
    {
        subject<Config, Layout> s(max_blocks, 64);
        auto& c = *s.cache;
        const auto seq = c.add_sequence();
        std::vector<double> t;
        for (int r = 0; r < rounds + 3; ++r) {
            const auto start = clock_type::now();
            for (int i = 0; i < 16; ++i) {
                c.append(seq, 16);
            }
            const auto d = clock_type::now() - start;
            c.truncate(seq, 0);
            s.sync();
            if (r >= 3) {
                t.push_back(ns(d) / 16);
            }
        }
        std::sort(t.begin(), t.end());
        b.committed_ns = t[t.size() / 2];
    }
    return b;
}

/// The baselines of one subject, measured once.
template <class Config, class Layout>
const baseline<Config, Layout>& baseline_of(std::uint32_t max_blocks) {
    static std::map<std::uint32_t, baseline<Config, Layout>> done;
    auto it = done.find(max_blocks);
    if (it == done.end()) {
        it = done.emplace(max_blocks, measure_baseline<Config, Layout>(max_blocks, 41)).first;
    }
    return it->second;
}

template <class Config, class Layout>
void report(benchmark::State& state, std::uint32_t max_blocks, double total_ns, std::size_t blocks) {
    const auto& b = baseline_of<Config, Layout>(max_blocks);
    const double per = blocks == 0 ? 0.0 : total_ns / static_cast<double>(blocks);
    state.counters["ns_per_block"] = per;
    state.counters["take_ns"] = b.take_ns;
    state.counters["committed_ns"] = b.committed_ns;
    state.counters["vs_take"] = per / b.take_ns;
    state.counters["vs_committed"] = per / b.committed_ns;
    state.counters["blocks"] = static_cast<double>(blocks);
}

template <class Config, class Layout>
void take(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    for (auto _ : state) {
        baseline_of<Config, Layout>(mb);
        state.SetIterationTime(1e-9);
    }
    const auto& b = baseline_of<Config, Layout>(mb);
    state.counters["take_ns"] = b.take_ns;
    state.counters["committed_ns"] = b.committed_ns;
    state.counters["fresh_fraction"] = b.fresh_fraction;
    state.counters["take_vs_committed"] = b.take_ns / b.committed_ns;
}

template <class Config, class Layout>
void lookup(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb);
    std::mt19937_64 rng(1);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    s.cache_prompt(tokens);
    double total = 0;
    for (auto _ : state) {
        const auto start = clock_type::now();
        const std::size_t hit = s.pc->lookup(tokens);
        const auto d = clock_type::now() - start;
        benchmark::DoNotOptimize(hit);
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
    }
    if (s.pc->lookup(tokens) != prompt_tokens) {
        state.SkipWithError("the prompt is not fully cached");
    }
    report<Config, Layout>(state, mb, total, static_cast<std::size_t>(state.iterations()) * prompt_blocks);
}

template <class Config, class Layout>
void attach(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb);
    std::mt19937_64 rng(2);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    s.cache_prompt(tokens);
    double total = 0;
    for (auto _ : state) {
        const auto start = clock_type::now();
        const auto a = s.pc->attach(tokens);
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        if (a.cached_tokens != prompt_tokens) {
            state.SkipWithError("attach found fewer blocks than the prompt's");
            break;
        }
        s.cache->free(a.seq);
    }
    report<Config, Layout>(state, mb, total, static_cast<std::size_t>(state.iterations()) * prompt_blocks);
}

template <class Config, class Layout>
void publish(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb);
    std::mt19937_64 rng(3);
    double total = 0;
    for (auto _ : state) {
        const tokens_t tokens = random_tokens(rng, prompt_tokens);
        const auto seq = s.cache->add_sequence();
        s.cache->append(seq, prompt_tokens);
        const auto start = clock_type::now();
        const std::size_t n = s.pc->publish(seq, tokens);
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        if (n != prompt_blocks) {
            state.SkipWithError("publish registered fewer blocks than the sequence's");
            break;
        }
        s.cache->free(seq);
        s.pc->clear();
        s.sync();
    }
    report<Config, Layout>(state, mb, total, static_cast<std::size_t>(state.iterations()) * prompt_blocks);
}

/// Plain (false): kv_cache::free; else prefix_cache::free; of a sequence attached to the cached
/// prompt, whose blocks stay cached.
template <class Config, class Layout, bool Prefix>
void free_seq(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb);
    std::mt19937_64 rng(4);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    s.cache_prompt(tokens);
    double total = 0;
    for (auto _ : state) {
        const auto a = s.pc->attach(tokens);
        const auto start = clock_type::now();
        if constexpr (Prefix) {
            benchmark::DoNotOptimize(s.pc->free(a.seq));
        } else {
            s.cache->free(a.seq);
        }
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
    }
    if (s.pc->cached_blocks() != prompt_blocks) {
        state.SkipWithError("the prompt's blocks did not stay cached");
    }
    const auto n = static_cast<std::size_t>(state.iterations());
    report<Config, Layout>(state, mb, total, n * prompt_blocks);
    state.counters["ns_per_free"] = total / static_cast<double>(n);
    state.counters["free_vs_take"] = total / static_cast<double>(n) / baseline_of<Config, Layout>(mb).take_ns;
}

/// evict(1), 128 times a round over a prompt cached anew each round (untimed), with
/// standing(subject) - 1 more prompts cached beside it from the start; per block evicted.
template <class Config, class Layout, class Standing>
void evict_one_by_one(benchmark::State& state, std::uint64_t seed, Standing&& standing) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb);
    std::mt19937_64 rng(seed);
    const std::size_t prompts = standing(s);
    for (std::size_t i = 0; i + 1 < prompts; ++i) {
        s.cache_prompt(random_tokens(rng, prompt_tokens));
    }
    s.sync();
    double total = 0;
    std::size_t evicted = 0;
    for (auto _ : state) {
        s.cache_prompt(random_tokens(rng, prompt_tokens));
        s.sync();
        double round = 0;
        for (std::size_t i = 0; i < prompt_blocks; ++i) {
            const auto start = clock_type::now();
            const auto r = s.pc->evict(1);
            round += ns(clock_type::now() - start);
            evicted += r.blocks.size();
        }
        state.SetIterationTime(round * 1e-9);
        total += round;
        s.sync();
    }
    report<Config, Layout>(state, mb, total, evicted);
    state.counters["evictable"] = static_cast<double>(s.pc->evictable_blocks());
}

template <class Config, class Layout>
void evict1(benchmark::State& state) {
    evict_one_by_one<Config, Layout>(state, 5, [](const auto&) { return std::size_t{1}; });
}

template <class Config, class Layout>
void evict1_deep(benchmark::State& state) {
    // Prompts kept cached: half the blocks, at most half the budget's (65,536 blocks of 2 MiB
    // would need 64 GiB: over quota on an H100, 2026-12-07).
    evict_one_by_one<Config, Layout>(state, 8, [&](const auto& s) {
        const std::size_t half = std::min<std::size_t>(s.cache->geometry().max_blocks / 2,
                                                       budget_bytes / s.pc->block_bytes() / 2);
        return std::max<std::size_t>(half / prompt_blocks, 1);
    });
}

template <class Config, class Layout>
void trim(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb, -1, {.max_cached_bytes = 0});
    std::mt19937_64 rng(6);
    double total = 0;
    std::size_t evicted = 0, moved = 0;
    for (auto _ : state) {
        // Held by a sequence while published (nothing evictable), then freed behind the prefix
        // cache's back: 128 blocks over the bound.
        const tokens_t tokens = random_tokens(rng, prompt_tokens);
        const auto seq = s.cache->add_sequence();
        s.cache->append(seq, prompt_tokens);
        s.pc->publish(seq, tokens);
        s.cache->free(seq);
        s.sync();
        const auto start = clock_type::now();
        const auto r = s.pc->trim();
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        evicted += r.blocks.size();
        moved += r.moved_blocks;
        s.sync();
    }
    report<Config, Layout>(state, mb, total, evicted);
    state.counters["moved"] = static_cast<double>(moved);
    state.counters["ns_per_call"] = total / static_cast<double>(state.iterations());
}

template <class Config, class Layout>
void compact(benchmark::State& state) {
    const auto mb = static_cast<std::uint32_t>(state.range(0));
    subject<Config, Layout> s(mb);
    std::mt19937_64 rng(7);
    double total = 0, sync_total = 0;
    std::size_t moved = 0;
    for (auto _ : state) {
        // 16 live blocks at the bottom, 48 above them freed (holes on pages the 16 keep), 48
        // cached blocks above those (ids 64-111: in layer_major a page of each region alone).
        const auto keep = s.cache->add_sequence();
        s.cache->append(keep, 16 * 16);
        const auto holes = s.cache->add_sequence();
        s.cache->append(holes, 48 * 16);
        s.cache_prompt(random_tokens(rng, 48 * 16));
        s.cache->free(holes);
        s.sync();
        const auto start = clock_type::now();
        const auto r = s.pc->compact();
        const auto mid = clock_type::now();
        s.sync();
        const auto end = clock_type::now();
        state.SetIterationTime(std::chrono::duration<double>(mid - start).count());
        total += ns(mid - start);
        sync_total += ns(end - mid);
        moved += r.moved_blocks;
        s.cache->free(keep);
        s.pc->clear();
        s.sync();
    }
    report<Config, Layout>(state, mb, total, moved);
    state.counters["sync_ns_per_block"] = moved == 0 ? 0.0 : sync_total / static_cast<double>(moved);
    state.counters["moved_per_call"] = static_cast<double>(moved) / static_cast<double>(state.iterations());
    state.counters["ns_per_call"] = total / static_cast<double>(state.iterations());
}

/// Registers every benchmark of (Config, Layout) for each max_blocks, named
/// <op>/<config>/<layout>/<max_blocks>; `scale` multiplies the iteration counts.
template <class Config, class Layout>
void register_all(const std::string& cfg, const std::string& layout, const std::vector<std::int64_t>& sizes,
                  double scale) {
    const auto it = [&](int n) { return static_cast<std::int64_t>(std::max(1.0, n * scale)); };
    const auto add = [&](const char* op, void (*fn)(benchmark::State&), int iters) {
        for (std::int64_t mb : sizes) {
            // An error (no device, memory refused) skips this benchmark, not the rest.
            const auto guarded = [fn](benchmark::State& state) {
                try {
                    fn(state);
                } catch (const std::exception& e) {
                    ++errors;
                    state.SkipWithError(e.what());
                }
            };
            benchmark::RegisterBenchmark((std::string(op) + "/" + cfg + "/" + layout).c_str(), guarded)
                ->Arg(mb)
                ->UseManualTime()
                ->Iterations(it(iters))
                ->Unit(benchmark::kMicrosecond);
        }
    };
    // Most wanted first: a run cut short by its timeout still has the take and free.
    add("take", take<Config, Layout>, 1);
    add("free_plain", free_seq<Config, Layout, false>, 400);
    add("free_prefix", free_seq<Config, Layout, true>, 400);
    add("lookup", lookup<Config, Layout>, 400);
    add("attach", attach<Config, Layout>, 400);
    add("publish", publish<Config, Layout>, 40);
    add("evict1", evict1<Config, Layout>, 10);
    add("trim", trim<Config, Layout>, 20);
    add("evict1_deep", evict1_deep<Config, Layout>, 10);
    add("compact", compact<Config, Layout>, 20);
}

} // namespace prefix_cost
