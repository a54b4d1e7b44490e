// bench_prefix_cache: what vmmpp::prefix_cache (vmmpp/prefix/) costs per block, and what it keeps
// on a shared-prefix trace, on the host backing (CI runs it briefly so it keeps working).
//
// 1. Cost per block, against kv_cache::append of one new block in the same binary (counter
//    vs_append_block: this operation's ns per block over append's): lookup and attach of a
//    2,048-token prompt fully cached, publish of a 2,048-token sequence, eviction of its 128
//    blocks in one call (evict(128)) and one at a time (evict(1) x 128), compaction (compact()
//    moving 64 cached blocks into holes of committed pages, per block moved).
// 2. A seeded synthetic trace (make_trace below) driven through prefix_cache with a
//    max_cached_bytes bound: hit rate, the idle footprint ratio (stats(): committed bytes over
//    the packed floor) at every idle moment, bytes back per block evicted, blocks compaction
//    moved, and the hit rate an exact block LRU of the same capacity gets on the same trace
//    (exact_lru below, no pages).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <list>
#include <optional>
#include <queue>
#include <random>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "common.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"

namespace {

using namespace vmmpp_bench;
using clock_type = std::chrono::steady_clock;
using tokens_t = std::vector<std::int32_t>;

// A Llama-3.2-1B-like geometry: 16 layers, 8 KV heads of 64, bf16, 16-token blocks: 512 KiB a
// block, 4 blocks a 2 MiB page in block_major; in layer_major 32 pieces of 16 KiB, one page of
// each (layer, K/V) region holding 128 blocks' pieces. 4,096 blocks (2 GiB reserved, committed
// only where blocks are).
constexpr vmmpp::kv_geometry geometry{.layers = 16, .kv_heads = 8, .head_dim = 64, .type = vmmpp::dtype::bf16,
                                      .block_tokens = 16, .max_blocks = 4096};
constexpr std::size_t prompt_tokens = 2048;
constexpr std::size_t prompt_blocks = prompt_tokens / 16;

template <class Layout>
using cache_t = vmmpp::kv_cache<vmmpp::host_config, Layout>;
template <class Layout>
using prefix_t = vmmpp::prefix_cache<cache_t<Layout>>;

double ns(clock_type::duration d) { return std::chrono::duration<double, std::nano>(d).count(); }

tokens_t random_tokens(std::mt19937_64& rng, std::size_t n) {
    std::uniform_int_distribution<std::int32_t> tok(0, 127999);  // a 128k vocabulary
    tokens_t t(n);
    for (auto& x : t) {
        x = tok(rng);
    }
    return t;
}

// ---------------------------------------------------------------------------------------------
// 1. Cost per block

/// kv_cache::append of one new block (16 tokens) whose page is already committed (the pool
/// keeps 64 spare pages, so the truncate between rounds gives nothing back): the bookkeeping
/// of one block, the baseline. ns per block, the median of 200 rounds of 64 appends; measured
/// once per layout.
template <class Layout>
double append_block_ns() {
    static const double value = [] {
        cache_t<Layout> c(geometry, {}, vmmpp::page_granular{.spare_pages = 64});
        const auto seq = c.add_sequence();
        std::vector<double> rounds;
        for (int r = 0; r < 210; ++r) {
            const auto start = clock_type::now();
            for (int i = 0; i < 64; ++i) {
                c.append(seq, 16);
            }
            const double per = ns(clock_type::now() - start) / 64;
            c.truncate(seq, 0);
            if (r >= 10) {
                rounds.push_back(per);  // the first rounds commit the pages
            }
        }
        std::sort(rounds.begin(), rounds.end());
        return rounds[rounds.size() / 2];
    }();
    return value;
}

/// Reports ns per block over the run and the ratio to append_block_ns.
template <class Layout>
void report_per_block(benchmark::State& state, double total_ns, std::size_t blocks) {
    const double per = total_ns / static_cast<double>(blocks);
    state.counters["ns_per_block"] = per;
    state.counters["append_block_ns"] = append_block_ns<Layout>();
    state.counters["vs_append_block"] = per / append_block_ns<Layout>();
    state.SetItemsProcessed(static_cast<std::int64_t>(blocks));
}

/// The baseline as a benchmark of its own: 64 appends of a new block, pages committed
/// (spare_pages) or committed as the blocks reach them (host_config's page_granular, no spare:
/// every fourth block in block_major commits a 2 MiB page, mprotect; the truncate gives them back).
template <class Layout, bool Spare>
void kv_append_block(benchmark::State& state) {
    cache_t<Layout> c(geometry, {}, vmmpp::page_granular{.spare_pages = Spare ? 64u : 0u});
    const auto seq = c.add_sequence();
    double total = 0;
    for (auto _ : state) {
        const auto start = clock_type::now();
        for (int i = 0; i < 64; ++i) {
            c.append(seq, 16);
        }
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        c.truncate(seq, 0);
    }
    report_per_block<Layout>(state, total, static_cast<std::size_t>(state.iterations()) * 64);
}

/// A cache holding `tokens` cached and evictable (appended, published, freed).
template <class Layout>
void cache_prompt(prefix_t<Layout>& pc, const tokens_t& tokens) {
    auto& c = pc.cache();
    const auto seq = c.add_sequence();
    c.append(seq, tokens.size());
    pc.publish(seq, tokens);
    pc.free(seq);
}

/// lookup of a 2,048-token prompt whose 128 blocks are all cached.
template <class Layout>
void lookup_2048(benchmark::State& state) {
    cache_t<Layout> c(geometry);
    prefix_t<Layout> pc(c);
    std::mt19937_64 rng(1);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    cache_prompt(pc, tokens);
    double total = 0;
    for (auto _ : state) {
        const auto start = clock_type::now();
        const std::size_t hit = pc.lookup(tokens);
        const auto d = clock_type::now() - start;
        benchmark::DoNotOptimize(hit);
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
    }
    if (pc.lookup(tokens) != prompt_tokens) {
        state.SkipWithError("the prompt is not fully cached");
    }
    report_per_block<Layout>(state, total, static_cast<std::size_t>(state.iterations()) * prompt_blocks);
}

/// attach of that prompt (a new sequence over its 128 cached blocks); the sequence is freed untimed.
template <class Layout>
void attach_2048(benchmark::State& state) {
    cache_t<Layout> c(geometry);
    prefix_t<Layout> pc(c);
    std::mt19937_64 rng(2);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    cache_prompt(pc, tokens);
    double total = 0;
    for (auto _ : state) {
        const auto start = clock_type::now();
        const auto a = pc.attach(tokens);
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        if (a.cached_tokens != prompt_tokens) {
            state.SkipWithError("attach found fewer blocks than the prompt's");
            break;
        }
        c.free(a.seq);
    }
    report_per_block<Layout>(state, total, static_cast<std::size_t>(state.iterations()) * prompt_blocks);
}

/// publish of a 2,048-token sequence (128 blocks registered); untimed: the sequence is freed
/// and its blocks evicted, then a new one appended.
template <class Layout>
void publish_2048(benchmark::State& state) {
    cache_t<Layout> c(geometry);
    prefix_t<Layout> pc(c);
    std::mt19937_64 rng(3);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    double total = 0;
    for (auto _ : state) {
        state.PauseTiming();
        const auto seq = c.add_sequence();
        c.append(seq, prompt_tokens);
        state.ResumeTiming();
        const auto start = clock_type::now();
        const std::size_t n = pc.publish(seq, tokens);
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        state.PauseTiming();
        if (n != prompt_blocks) {
            state.SkipWithError("publish registered fewer blocks than the prompt's");
        }
        pc.free(seq);
        (void)pc.clear();
        state.ResumeTiming();
    }
    report_per_block<Layout>(state, total, static_cast<std::size_t>(state.iterations()) * prompt_blocks);
}

/// Eviction of a 2,048-token prompt's 128 cached blocks, all evictable: in one call (evict(128),
/// whole pages first) or one block a call (evict(1) x 128, as append's refusal path asks when
/// one block is missing). The pages come back to the OS (madvise + mprotect) inside the timing.
/// Refilled untimed.
template <class Layout, bool OneAtATime>
void evict_2048(benchmark::State& state) {
    cache_t<Layout> c(geometry);
    prefix_t<Layout> pc(c);
    std::mt19937_64 rng(4);
    const tokens_t tokens = random_tokens(rng, prompt_tokens);
    double total = 0;
    std::size_t evicted = 0, freed = 0;
    for (auto _ : state) {
        state.PauseTiming();
        cache_prompt(pc, tokens);
        state.ResumeTiming();
        const auto start = clock_type::now();
        if constexpr (OneAtATime) {
            for (std::size_t i = 0; i < prompt_blocks; ++i) {
                const auto r = pc.evict(1);
                evicted += r.blocks.size();
                freed += r.freed_page_bytes;
            }
        } else {
            const auto r = pc.evict(prompt_blocks);
            evicted += r.blocks.size();
            freed += r.freed_page_bytes;
        }
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
    }
    if (evicted != static_cast<std::size_t>(state.iterations()) * prompt_blocks) {
        state.SkipWithError("evicted another number of blocks than cached");
    }
    report_per_block<Layout>(state, total, evicted);
    state.counters["bytes_back_per_block"] = static_cast<double>(freed) / static_cast<double>(std::max<std::size_t>(evicted, 1));
    state.counters["block_bytes"] = static_cast<double>(pc.block_bytes());
}

/// compact() moving 64 cached blocks down into holes of committed pages: 256 one-block prompts
/// cached (ids 0..255), the odd ids published first, so evict(128) (untimed) takes them and
/// leaves a hole beside every even block; compaction then moves the even blocks 128..254 into
/// the odd holes 1..127, and ids 128..255's pages go back (madvise + mprotect inside the timing).
/// Per block moved. `Written`: every block's bytes written in the setup, so the copy meets
/// resident memory (an engine writes its KV); otherwise the blocks were never touched and the
/// copy also pays the host's first-touch page faults (4 KiB each) on its destination.
template <class Layout, bool Written>
void compact_holes(benchmark::State& state) {
    cache_t<Layout> c(geometry);
    prefix_t<Layout> pc(c);
    std::mt19937_64 rng(5);
    std::vector<tokens_t> prompts;
    for (int i = 0; i < 256; ++i) {
        prompts.push_back(random_tokens(rng, 16));
    }
    double total = 0;
    std::size_t moved = 0, freed = 0;
    for (auto _ : state) {
        state.PauseTiming();
        std::vector<vmmpp::seq_id> seqs;
        for (const tokens_t& t : prompts) {
            seqs.push_back(c.add_sequence());
            c.append(seqs.back(), t.size());
            if constexpr (Written) {
                const auto b = static_cast<std::uint32_t>(c.block_table(seqs.back())[0]);
                Layout::for_each_piece(geometry, b, [&](std::size_t off, std::size_t bytes) {
                    std::memset(c.pool().base() + off, static_cast<int>(b & 0xff), bytes);
                });
            }
        }
        for (int odd : {1, 0}) {
            for (std::size_t i = static_cast<std::size_t>(odd); i < seqs.size(); i += 2) {
                pc.publish(seqs[i], prompts[i]);
            }
        }
        for (auto s : seqs) {
            c.free(s);
        }
        (void)pc.evict(128);
        state.ResumeTiming();
        const auto start = clock_type::now();
        const auto r = pc.compact();
        const auto d = clock_type::now() - start;
        state.SetIterationTime(std::chrono::duration<double>(d).count());
        total += ns(d);
        moved += r.moved_blocks;
        freed += r.freed_page_bytes;
        state.PauseTiming();
        (void)pc.clear();
        state.ResumeTiming();
    }
    if (moved != static_cast<std::size_t>(state.iterations()) * 64) {
        state.SkipWithError("compaction moved another number of blocks than 64 a round");
    }
    report_per_block<Layout>(state, total, std::max<std::size_t>(moved, 1));
    state.counters["bytes_back_per_block_moved"] = static_cast<double>(freed) / static_cast<double>(std::max<std::size_t>(moved, 1));
    state.counters["block_bytes"] = static_cast<double>(pc.block_bytes());
}

// ---------------------------------------------------------------------------------------------
// 2. The shared-prefix trace

/// The trace's generator (seeded): 8 system prompts of 512-1,024 tokens (uniform); `waves`
/// waves of 40 sessions each, arriving Poisson within a wave (exponential gaps, mean 40 decode
/// steps); a session picks a system prompt (uniform) and runs 2-6 turns (uniform); turn k's
/// prompt is turn k-1's prompt and answer plus a user message of 32-256 tokens (the first:
/// the system prompt plus one), its answer 32-256 tokens decoded one a step; the next turn is
/// ready an exponential think time (mean 300 steps) after the answer ends. At most 8 requests
/// live at once, admitted in order of readiness. A wave starts when the last one has drained:
/// those are the idle moments (no request live). Token ids are uniform over 128k.
struct session {
    std::size_t system;
    std::size_t turns;
    std::uint64_t arrival;
    std::vector<std::size_t> user_lengths, answer_lengths;
    std::uint64_t seed;  // its messages' tokens
};
struct trace {
    std::vector<tokens_t> system_prompts;
    std::vector<std::vector<session>> waves;
    std::uint64_t think_seed;
};
trace make_trace(std::uint64_t seed, std::size_t waves) {
    std::mt19937_64 rng(seed);
    trace t;
    std::uniform_int_distribution<std::size_t> sys_len(512, 1024), msg_len(32, 256), turns(2, 6), pick(0, 7);
    std::exponential_distribution<double> gap(1.0 / 40);
    for (int i = 0; i < 8; ++i) {
        t.system_prompts.push_back(random_tokens(rng, sys_len(rng)));
    }
    for (std::size_t w = 0; w < waves; ++w) {
        std::vector<session> wave;
        double at = 0;
        for (int s = 0; s < 40; ++s) {
            session x{pick(rng), turns(rng), static_cast<std::uint64_t>(at), {}, {}, rng()};
            for (std::size_t k = 0; k < x.turns; ++k) {
                x.user_lengths.push_back(msg_len(rng));
                x.answer_lengths.push_back(msg_len(rng));
            }
            wave.push_back(std::move(x));
            at += gap(rng);
        }
        t.waves.push_back(std::move(wave));
    }
    t.think_seed = rng();
    return t;
}

/// The reference: an exact LRU over block keys, no pages, mirroring prefix_cache's rules: a
/// request's chain is looked up from its first block (hits while found), its full blocks are
/// registered as it publishes (a key already cached is left alone), a cached block a live
/// request holds is pinned, a touch makes a chain newest tail first, and past `capacity`
/// unpinned blocks the least recently used unpinned block goes, one at a time.
class exact_lru {
public:
    explicit exact_lru(std::size_t capacity) : capacity_(capacity) {}
    using held_t = std::vector<std::optional<vmmpp::block_key>>;  // per request: block i cached under

    void attach(std::span<const vmmpp::block_key> keys, held_t& held) {
        std::size_t found = 0;
        while (found < keys.size() && map_.contains(keys[found])) {
            ++found;
        }
        held.assign(keys.size(), std::nullopt);
        for (std::size_t i = 0; i < found; ++i) {
            pin(keys[i]);
            held[i] = keys[i];
        }
        hits += found;
        misses += keys.size() - found;
        touch_chain(keys, held);
    }
    void publish(std::span<const vmmpp::block_key> keys, held_t& held) {
        held.resize(std::max(held.size(), keys.size()));
        for (std::size_t i = 0; i < keys.size(); ++i) {
            if (!held[i] && !map_.contains(keys[i])) {
                order_.push_back(keys[i]);
                map_.emplace(keys[i], node{1, std::prev(order_.end())});
                held[i] = keys[i];
            }
        }
        touch_chain(keys, held);
    }
    void free(const held_t& held) {
        for (const auto& k : held) {
            if (k && --map_.at(*k).refs == 0) {
                ++evictable_;
            }
        }
        while (evictable_ > capacity_) {
            auto it = std::find_if(order_.begin(), order_.end(), [&](const vmmpp::block_key& k) { return map_.at(k).refs == 0; });
            map_.erase(*it);
            order_.erase(it);
            --evictable_;
            ++evictions;
        }
    }
    std::uint64_t hits = 0, misses = 0, evictions = 0;

private:
    struct node {
        std::size_t refs;
        std::list<vmmpp::block_key>::iterator where;
    };
    void pin(const vmmpp::block_key& k) {
        if (map_.at(k).refs++ == 0) {
            --evictable_;
        }
    }
    void touch_chain(std::span<const vmmpp::block_key> keys, const held_t& held) {
        for (std::size_t i = std::min(keys.size(), held.size()); i-- > 0;) {
            if (held[i] && *held[i] == keys[i]) {
                auto& n = map_.at(keys[i]);
                order_.splice(order_.end(), order_, n.where);
            }
        }
    }
    std::size_t capacity_;
    std::size_t evictable_ = 0;
    std::list<vmmpp::block_key> order_;  // oldest first, pinned blocks too
    std::unordered_map<vmmpp::block_key, node, vmmpp::block_key_hash> map_;
};

std::vector<vmmpp::block_key> keys_of(std::span<const std::int32_t> tokens) {
    std::vector<vmmpp::block_key> keys;
    vmmpp::for_each_block_key(tokens, geometry.block_tokens, {}, [&](std::size_t, const vmmpp::block_key& k) {
        keys.push_back(k);
        return true;
    });
    return keys;
}

/// What makes the trace give cached blocks up: the max_cached_bytes bound (trim after each free,
/// LRU then compaction), or a quota of range(0) blocks' bytes with no bound, where an append
/// refused over_quota evicts: prefix_cache::append's own way (LRU blocks, then compaction), or
/// whole page groups, oldest group first (evict_bytes; single blocks where no group is left:
/// what prefix_cache::append did before compaction), done here around kv_cache::append.
enum class pressure { bound, quota_page_groups, quota_lru_compact };
template <class Layout>
using quota_cache_t = vmmpp::kv_cache<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>, Layout>;

/// The trace through a prefix_cache bounded at range(0) cached blocks' bytes (max_cached_bytes)
/// and through exact_lru of range(0) blocks, in lockstep (or, under a quota, through the prefix
/// cache alone: `Pressure`). Counters: hit rates, the footprint at idle moments and while busy,
/// bytes back per block evicted.
template <class Layout, pressure Pressure = pressure::bound>
void shared_prefix_trace(benchmark::State& state) {
    constexpr bool bounded = Pressure == pressure::bound;
    using trace_cache_t = std::conditional_t<bounded, cache_t<Layout>, quota_cache_t<Layout>>;
    const auto bound_blocks = static_cast<std::size_t>(state.range(0));
    const auto waves = static_cast<std::size_t>(state.range(1));
    for (auto _ : state) {
        std::size_t block_bytes = 0;
        Layout::for_each_piece(geometry, 0, [&](std::size_t, std::size_t b) { block_bytes += b; });
        std::optional<vmmpp::budget> budget;
        std::optional<trace_cache_t> cache;
        if constexpr (bounded) {
            cache.emplace(geometry);
        } else {
            budget.emplace(bound_blocks * block_bytes);
            cache.emplace(geometry, vmmpp::host::options{}, vmmpp::page_granular{},
                          budget->register_model("kv", bound_blocks * block_bytes));
        }
        trace_cache_t& c = *cache;
        vmmpp::prefix_cache<trace_cache_t> pc(
            c, {.max_cached_bytes = bounded ? bound_blocks * block_bytes : std::numeric_limits<std::size_t>::max()});
        std::size_t reclaim_rounds = 0;
        // An append: prefix_cache's (its refusal path), or page groups evicted here.
        const auto grow = [&](vmmpp::seq_id seq, std::size_t n) {
            if constexpr (Pressure != pressure::quota_page_groups) {
                pc.append(seq, n);
            } else {
                for (;;) {
                    try {
                        c.append(seq, n);
                        return;
                    } catch (const vmmpp::over_quota& e) {
                        ++reclaim_rounds;
                        const std::size_t room = e.limit() > e.in_use() ? e.limit() - e.in_use() : 0;
                        const std::size_t short_by = e.requested() > room ? e.requested() - room : block_bytes;
                        if (pc.evict_bytes(short_by).blocks.empty() &&
                            pc.evict((short_by + block_bytes - 1) / block_bytes).blocks.empty()) {
                            throw;
                        }
                    }
                }
            }
        };
        exact_lru ref(bounded ? bound_blocks : std::numeric_limits<std::size_t>::max());
        const trace tr = make_trace(20261207, waves);
        std::mt19937_64 think_rng(tr.think_seed);
        std::exponential_distribution<double> think(1.0 / 300);

        struct live_request {
            std::size_t session;
            tokens_t tokens;  // prompt, then the answer as it is decoded
            std::size_t answer_left;
            vmmpp::seq_id seq;
            exact_lru::held_t held;
        };
        std::vector<double> idle_ratios, busy_ratios;
        std::size_t evicted = 0, committed_drop = 0, freed_page_bytes = 0, requests = 0, max_live_blocks = 0;
        std::size_t moved = 0, compactions_moving = 0;
        const std::size_t block_tokens = geometry.block_tokens;

        for (const auto& wave : tr.waves) {
            struct state_t {
                tokens_t history;
                std::size_t turn = 0;
                std::mt19937_64 rng;
            };
            std::vector<state_t> sessions(wave.size());
            using ready_t = std::pair<std::uint64_t, std::size_t>;  // (ready step, session)
            std::priority_queue<ready_t, std::vector<ready_t>, std::greater<>> ready;
            for (std::size_t s = 0; s < wave.size(); ++s) {
                sessions[s].history = tr.system_prompts[wave[s].system];
                sessions[s].rng.seed(wave[s].seed);
                ready.emplace(wave[s].arrival, s);
            }
            std::vector<live_request> live;
            for (std::uint64_t step = 0; !ready.empty() || !live.empty(); ++step) {
                if (live.empty() && ready.top().first > step) {
                    step = ready.top().first;  // nothing to do until then
                }
                while (live.size() < 8 && !ready.empty() && ready.top().first <= step) {
                    const std::size_t s = ready.top().second;
                    ready.pop();
                    auto& ss = sessions[s];
                    live_request r{s, ss.history, wave[s].answer_lengths[ss.turn], 0, {}};
                    const tokens_t user = random_tokens(ss.rng, wave[s].user_lengths[ss.turn]);
                    r.tokens.insert(r.tokens.end(), user.begin(), user.end());
                    // The engine asks about all prompt tokens but the last (it needs its logits).
                    const std::span<const std::int32_t> asked(r.tokens.data(), r.tokens.size() - 1);
                    const auto a = pc.attach(asked);
                    r.seq = a.seq;
                    grow(r.seq, r.tokens.size() - a.cached_tokens);
                    pc.publish(r.seq, r.tokens);
                    const auto asked_keys = keys_of(asked);
                    ref.attach(asked_keys, r.held);
                    ref.publish(keys_of(r.tokens), r.held);
                    ++requests;
                    live.push_back(std::move(r));
                }
                for (std::size_t i = 0; i < live.size();) {
                    auto& r = live[i];
                    auto& ss = sessions[r.session];
                    r.tokens.push_back(random_tokens(ss.rng, 1)[0]);
                    grow(r.seq, 1);
                    const bool done = --r.answer_left == 0;
                    if (r.tokens.size() % block_tokens == 0 || done) {
                        pc.publish(r.seq, r.tokens);
                        ref.publish(keys_of(r.tokens), r.held);
                    }
                    if (!done) {
                        ++i;
                        continue;
                    }
                    max_live_blocks = std::max(max_live_blocks, c.used_blocks());
                    // pc.free(seq) is kv_cache::free, then trim() (evictions, then compaction
                    // if it evicted), else compact(); split so the committed bytes those give
                    // back are seen alone.
                    c.free(r.seq);
                    const std::size_t before = c.pool().committed_bytes();
                    auto ev = pc.trim();
                    if (ev.blocks.empty()) {
                        ev = pc.compact();
                    }
                    committed_drop += before - c.pool().committed_bytes();
                    evicted += ev.blocks.size();
                    freed_page_bytes += ev.freed_page_bytes;
                    moved += ev.moved_blocks;
                    compactions_moving += ev.moved_blocks > 0 ? 1 : 0;
                    ref.free(r.held);
                    ss.history = std::move(r.tokens);
                    if (++ss.turn < wave[r.session].turns) {
                        ready.emplace(step + 1 + static_cast<std::uint64_t>(think(think_rng)), r.session);
                    }
                    live[i] = std::move(live.back());
                    live.pop_back();
                }
                if (step % 256 == 0 && !live.empty()) {
                    busy_ratios.push_back(pc.stats().idle_footprint_ratio);
                }
            }
            idle_ratios.push_back(pc.stats().idle_footprint_ratio);  // the wave has drained
        }

        const auto s = pc.stats();
        const auto mean = [](const std::vector<double>& v) {
            return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
        };
        const double hit_rate = static_cast<double>(s.hits) / static_cast<double>(std::max<std::uint64_t>(s.hits + s.misses, 1));
        const double lru_rate = static_cast<double>(ref.hits) / static_cast<double>(std::max<std::uint64_t>(ref.hits + ref.misses, 1));
        state.counters["hit_rate"] = hit_rate;
        state.counters["lru_hit_rate"] = lru_rate;
        state.counters["hit_rate_gap_pp"] = 100 * (lru_rate - hit_rate);
        state.counters["hits"] = static_cast<double>(s.hits);
        state.counters["misses"] = static_cast<double>(s.misses);
        state.counters["lru_hits"] = static_cast<double>(ref.hits);
        state.counters["idle_footprint_ratio_final"] = s.idle_footprint_ratio;
        state.counters["idle_footprint_ratio_mean"] = mean(idle_ratios);
        state.counters["idle_footprint_ratio_max"] = *std::max_element(idle_ratios.begin(), idle_ratios.end());
        state.counters["busy_footprint_ratio_mean"] = mean(busy_ratios);
        state.counters["idle_moments"] = static_cast<double>(idle_ratios.size());
        state.counters["cached_blocks_final"] = static_cast<double>(s.cached_blocks);
        state.counters["evictions"] = static_cast<double>(s.evictions);
        state.counters["lru_evictions"] = static_cast<double>(ref.evictions);
        state.counters["bytes_back_per_block"] = static_cast<double>(committed_drop) / static_cast<double>(std::max<std::size_t>(evicted, 1));
        state.counters["bytes_back_over_block_bytes"] =
            static_cast<double>(committed_drop) / static_cast<double>(std::max<std::size_t>(evicted, 1) * block_bytes);
        state.counters["moves"] = static_cast<double>(s.moves);
        state.counters["moves_per_eviction"] = static_cast<double>(moved) / static_cast<double>(std::max<std::size_t>(evicted, 1));
        state.counters["compactions_moving"] = static_cast<double>(compactions_moving);
        state.counters["freed_page_bytes_match"] = freed_page_bytes == committed_drop ? 1 : 0;
        state.counters["block_bytes"] = static_cast<double>(block_bytes);
        state.counters["requests"] = static_cast<double>(requests);
        state.counters["max_used_blocks"] = static_cast<double>(max_live_blocks);
        state.counters["reclaim_rounds"] = static_cast<double>(reclaim_rounds);
        if (bounded && (s.evictions != evicted || s.moves != moved)) {
            state.SkipWithError("evictions outside the trims after free: the split accounting misses some");
        }
    }
}

/// Registers every benchmark of layout L; `min_time` (seconds, 0: the command line's or the
/// library's default) for the cost benchmarks.
template <class L>
void register_layout(double min_time) {
    const std::string layout(vmmpp::type_name<L>);
    const auto cost = [&](const std::string& name, auto fn) {
        auto* b = benchmark::RegisterBenchmark((name + "/" + layout).c_str(), fn)->UseManualTime();
        if (min_time > 0) {
            b->MinTime(min_time);
        }
    };
    cost("kv_append_block/committed", kv_append_block<L, true>);
    cost("kv_append_block/commit_pages", kv_append_block<L, false>);
    cost("lookup_2048", lookup_2048<L>);
    cost("attach_2048", attach_2048<L>);
    cost("publish_2048", publish_2048<L>);
    cost("evict_2048/batch", evict_2048<L, false>);
    cost("evict_2048/one_at_a_time", evict_2048<L, true>);
    cost("compact_holes/untouched", compact_holes<L, false>);
    cost("compact_holes/written", compact_holes<L, true>);
    // Bounds of 256 and 1,024 cached blocks (128 and 512 MiB), 4 waves of 40 sessions: one pass.
    auto* b = benchmark::RegisterBenchmark(("shared_prefix_trace/" + layout).c_str(), shared_prefix_trace<L>);
    b->ArgNames({"bound_blocks", "waves"})->Args({256, 4})->Args({1024, 4})->Iterations(1)->Unit(benchmark::kMillisecond);
    // A quota of 1,536 and 2,048 blocks (768 MiB, 1 GiB), no bound: evict_bytes' page groups
    // against LRU evictions then compaction, when an append is refused memory.
    using trace_fn = void (*)(benchmark::State&);
    for (const auto& [name, fn] : {std::pair<const char*, trace_fn>{"page_groups", shared_prefix_trace<L, pressure::quota_page_groups>},
                                   std::pair<const char*, trace_fn>{"lru_compact", shared_prefix_trace<L, pressure::quota_lru_compact>}}) {
        auto* q = benchmark::RegisterBenchmark(("shared_prefix_trace_quota/" + std::string(name) + "/" + layout).c_str(), fn);
        q->ArgNames({"quota_blocks", "waves"})->Args({1536, 4})->Args({2048, 4})->Iterations(1)->Unit(benchmark::kMillisecond);
    }
}

} // namespace

// The cost benchmarks run 0.2 s of measured time each unless --benchmark_min_time is given (a
// benchmark's own MinTime would win over the flag), so the whole binary stays well under a
// minute on 2 cores and CI can run it shorter.
int main(int argc, char** argv) {
    bool min_time_given = false;
    for (int i = 1; i < argc; ++i) {
        min_time_given = min_time_given || std::string_view(argv[i]).starts_with("--benchmark_min_time");
    }
    const double min_time = min_time_given ? 0.0 : 0.2;
    register_layout<vmmpp::block_major>(min_time);
    register_layout<vmmpp::layer_major>(min_time);
    return vmmpp_bench::run_benchmarks(argc, argv);
}
