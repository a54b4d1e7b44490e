// bench/multi_model/simulator.hpp: the discrete-event serving loop, templated over one pool
// configuration and KV layout, so the very same code replays a trace on static slices, on one
// shared budget, on the host or on a GPU.
//
// Time is simulated; memory is not. Each model has its own timeline of engine steps (compute is
// never shared, see models.hpp); every KV allocation is a real kv_cache call on the real pool,
// and its measured wall time (steady_clock) is added to the step of the model that made it.
//
// One step of model m, starting at time t:
//   1. admission: waiting requests, first come first served (preempted ones first), each gets a
//      sequence and `append(seq, prompt + tokens already generated)`. The first refusal
//      (vmmpp::over_quota, out_of_blocks or out_of_memory) undoes that sequence and stops
//      admission: the request waits. A step prefills at most `max_batch_prefill_tokens` tokens
//      (at least one request) and runs at most `max_running` requests.
//   2. the step ends at t + base + prefill_tokens * per_token + decoding * per_running
//      + measured memory time (admission, and the previous step's end).
//   3. at its end every request of the batch has one more token: a request's first one sets its
//      time to first token (TTFT = end - arrival); finished requests free their sequences; the
//      others append one token. When an append is refused, the youngest running request of that
//      model (latest arrival) is preempted: freed and put back at the front of the queue, to be
//      recomputed (prompt + tokens so far) when admitted again, as vLLM's recompute preemption.
// After every step end, idle models with waiting requests try again (memory may have been freed).
// A model that was refused does not try again until the free memory it saw has grown (an engine
// checks before it allocates; the simulator learns the need by trying once, for real).
// A request that can never fit (more blocks than its cache can ever hold, or refused when no
// memory is in use anywhere it could come from) is rejected and counted.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <queue>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "models.hpp"
#include "trace.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/quota/shared_budget.hpp"

namespace multi_model {

/// What a scheduler step may hold (vLLM's max_num_batched_tokens and max_num_seqs).
struct scheduler_limits {
    std::uint64_t max_batch_prefill_tokens = 8192;
    std::size_t max_running = 256;
};

struct sim_options {
    /// Add the measured wall time of memory operations to the steps (off: a deterministic run).
    bool charge_memory_time = true;
    scheduler_limits limits;
    /// Points kept of the committed-memory timeline (each the maximum over its time bucket).
    std::size_t timeline_points = 600;
};

/// Why a cache call was refused, if it was.
enum class refusal { none, quota, blocks, memory };

/// One model's results in one run.
struct model_result {
    std::string name;
    std::size_t requests = 0;
    std::size_t completed = 0;
    std::size_t rejected = 0;     ///< could never fit
    std::size_t unfinished = 0;   ///< still waiting or running when the events ran out (a bug if > 0)
    std::uint64_t output_tokens = 0;  ///< of completed requests
    std::uint64_t preemptions = 0;
    std::uint64_t refused_quota = 0;   ///< admissions refused by the budget
    std::uint64_t refused_blocks = 0;  ///< admissions refused for want of free blocks (a full slice)
    std::uint64_t refused_memory = 0;  ///< admissions refused by the backing (real out of memory)
    std::size_t memory_waits = 0;      ///< requests that found memory short at their turn, at least once
    std::uint64_t steps = 0;
    double last_finish_us = 0;
    std::vector<double> ttft_us;  ///< of every request that got a first token
    std::size_t reserved = 0;     ///< bytes of address space of its cache
    std::size_t peak_committed = 0;
    double mean_committed = 0;    ///< time-weighted over the run
    double memory_op_us = 0;      ///< wall time inside kv_cache calls
    double backing_us = 0;        ///< of which inside the backing's commit/decommit
    std::uint64_t commits = 0;
    std::uint64_t decommits = 0;
};

/// One run of a trace on one configuration.
struct run_result {
    std::string mode;
    std::vector<model_result> models;
    double makespan_us = 0;           ///< time of the last event
    std::size_t peak_committed = 0;   ///< of the sum over pools, sampled after every event
    double mean_committed = 0;        ///< time-weighted mean of that sum
    std::vector<std::pair<double, std::size_t>> timeline;  ///< (time_us, most committed in bucket)
    double wall_s = 0;
};

/// Adds the wall time of its own lifetime to two sinks (the next step's charge and the total).
class stopwatch {
public:
    stopwatch(double& step, double& total) : step_(step), total_(total), start_(clock::now()) {}
    stopwatch(const stopwatch&) = delete;
    stopwatch& operator=(const stopwatch&) = delete;
    ~stopwatch() {
        const double us = std::chrono::duration<double, std::micro>(clock::now() - start_).count();
        step_ += us;
        total_ += us;
    }

private:
    using clock = std::chrono::steady_clock;
    double& step_;
    double& total_;
    clock::time_point start_;
};

template <class Config, class Layout>
class simulator {
public:
    using cache_type = vmmpp::kv_cache<Config, Layout>;
    /// Whether the models' caches draw on one budget (memory one frees another may take).
    static constexpr bool shares_memory = std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>;

    /// `caches[i]` serves `models[i]`; `shared_limit` is the budget's global limit when
    /// shares_memory.
    simulator(std::string mode, const trace& t, const std::vector<model_spec>& models,
              std::vector<std::unique_ptr<cache_type>> caches, std::size_t shared_limit, sim_options options)
        : mode_(std::move(mode)), trace_(t), options_(options), shared_limit_(shared_limit), outcomes_(t.requests.size()) {
        for (std::size_t i = 0; i < models.size(); ++i) {
            model_state s;
            s.spec = &models[i];
            s.cache = std::move(caches[i]);
            s.result.name = models[i].name;
            s.result.reserved = s.cache->pool().capacity();
            Layout::for_each_piece(s.cache->geometry(), 0, [&](std::size_t, std::size_t) { ++s.pieces_per_block; });
            models_.push_back(std::move(s));
        }
    }

    /// Replays the whole trace; the caches are empty again afterwards.
    run_result run() {
        const auto wall_start = std::chrono::steady_clock::now();
        const auto& requests = trace_.requests;
        std::size_t next = 0;
        while (next < requests.size() || !step_ends_.empty()) {
            if (!step_ends_.empty() && (next == requests.size() || step_ends_.top().first <= requests[next].arrival_us)) {
                const auto [time, m] = step_ends_.top();
                step_ends_.pop();
                now_ = time;
                end_step(models_[m]);
                start_step(m);
                wake_idle();
            } else {
                now_ = requests[next].arrival_us;
                arrive(next++);
            }
            sample_memory();
        }
        return collect(std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count());
    }

private:
    struct live {
        std::size_t index;  // into the trace
        vmmpp::seq_id seq;
    };
    struct model_state {
        const model_spec* spec = nullptr;
        std::unique_ptr<cache_type> cache;
        std::deque<std::size_t> waiting;  // trace indices, front first
        std::vector<live> running;        // sorted by trace index: oldest first
        bool busy = false;
        double pending_memory_us = 0;     // measured, charged to the next step
        // The waiting request last refused, and the free memory it saw then.
        std::size_t refused_head = std::numeric_limits<std::size_t>::max();
        std::size_t refused_headroom = 0;
        std::size_t pieces_per_block = 0;
        std::size_t committed = 0;        // at the last sample
        double committed_area = 0;        // byte-microseconds
        model_result result;
    };
    struct outcome {
        double first_token_us = -1;
        std::uint32_t generated = 0;
        bool waited_for_memory = false;
    };

    // --- events ---

    void arrive(std::size_t i) {
        const request& r = trace_.requests[i];
        model_state& s = models_[r.model];
        ++s.result.requests;
        if (s.cache->blocks_needed(std::size_t{r.prompt_tokens} + r.output_tokens) > s.cache->geometry().max_blocks) {
            ++s.result.rejected;
            return;
        }
        s.waiting.push_back(i);
        if (!s.busy) {
            start_step(r.model);
        }
    }

    void start_step(std::uint32_t m) {
        model_state& s = models_[m];
        const std::size_t decoding = s.running.size();
        const std::uint64_t prefill_tokens = admit(s);
        if (s.running.empty()) {
            s.busy = false;
            s.pending_memory_us = 0;  // an idle model has time to spare
            return;
        }
        double step_us = s.spec->kind->cost.step_us(prefill_tokens, decoding);
        if (options_.charge_memory_time) {
            step_us += s.pending_memory_us;
        }
        s.pending_memory_us = 0;
        s.busy = true;
        ++s.result.steps;
        step_ends_.emplace(now_ + step_us, m);
    }

    void end_step(model_state& s) {
        // Every request of the batch has a new token; the finished ones leave.
        std::size_t kept = 0;
        for (const live& r : s.running) {
            outcome& o = outcomes_[r.index];
            ++o.generated;
            if (o.first_token_us < 0) {
                o.first_token_us = now_;
            }
            if (o.generated < trace_.requests[r.index].output_tokens) {
                s.running[kept++] = r;
                continue;
            }
            {
                stopwatch w(s.pending_memory_us, s.result.memory_op_us);
                s.cache->free(r.seq);
            }
            ++s.result.completed;
            s.result.output_tokens += trace_.requests[r.index].output_tokens;
            s.result.last_finish_us = now_;
        }
        s.running.resize(kept);
        // The others store it, oldest first; a refusal preempts the youngest (maybe itself).
        for (std::size_t i = 0; i < s.running.size();) {
            if (memory_call(s, [&] { s.cache->append(s.running[i].seq, 1); }) == refusal::none) {
                ++i;
            } else {
                preempt(s);
            }
        }
        s.busy = false;
    }

    /// Frees the youngest running request and queues it first, for recompute.
    void preempt(model_state& s) {
        const live victim = s.running.back();
        s.running.pop_back();
        {
            stopwatch w(s.pending_memory_us, s.result.memory_op_us);
            s.cache->free(victim.seq);
        }
        ++s.result.preemptions;
        s.waiting.push_front(victim.index);
    }

    /// Retries idle models with waiting requests: the step that just ended may have freed memory.
    void wake_idle() {
        for (std::uint32_t m = 0; m < models_.size(); ++m) {
            if (!models_[m].busy && !models_[m].waiting.empty()) {
                start_step(m);
            }
        }
    }

    // --- admission ---

    /// Admits waiting requests while memory and the step's limits allow; returns prefill tokens.
    std::uint64_t admit(model_state& s) {
        std::uint64_t prefill_tokens = 0;
        while (!s.waiting.empty() && s.running.size() < options_.limits.max_running) {
            const std::size_t i = s.waiting.front();
            const std::size_t tokens = std::size_t{trace_.requests[i].prompt_tokens} + outcomes_[i].generated;
            if (prefill_tokens > 0 && prefill_tokens + tokens > options_.limits.max_batch_prefill_tokens) {
                break;
            }
            if (!worth_trying(s, i, tokens)) {
                outcomes_[i].waited_for_memory = true;
                break;
            }
            vmmpp::seq_id seq = 0;
            {
                stopwatch w(s.pending_memory_us, s.result.memory_op_us);
                seq = s.cache->add_sequence();
            }
            const refusal why = memory_call(s, [&] { s.cache->append(seq, tokens); });
            if (why != refusal::none) {
                {
                    stopwatch w(s.pending_memory_us, s.result.memory_op_us);
                    s.cache->free(seq);
                }
                if (s.running.empty() && !memory_may_come(s)) {
                    ++s.result.rejected;  // refused with nothing in use it could wait for
                    s.waiting.pop_front();
                    continue;
                }
                count_refusal(s.result, why);
                outcomes_[i].waited_for_memory = true;
                s.refused_head = i;
                s.refused_headroom = headroom(s);
                break;
            }
            s.waiting.pop_front();
            const auto at = std::upper_bound(s.running.begin(), s.running.end(), i,
                                             [](std::size_t index, const live& r) { return index < r.index; });
            s.running.insert(at, live{i, seq});
            prefill_tokens += tokens;
        }
        return prefill_tokens;
    }

    /// False when an append of `tokens` for request `i` is sure to be refused: the free memory
    /// cannot hold its blocks even if every piece shared a page with a live block, or nothing was
    /// freed since the same request was last refused.
    bool worth_trying(const model_state& s, std::size_t i, std::size_t tokens) const {
        const std::size_t free = headroom(s);
        if (s.refused_head == i && free <= s.refused_headroom) {
            return false;
        }
        const std::size_t needed = s.cache->blocks_needed(tokens) * s.spec->block_bytes();
        const std::size_t slack = s.pieces_per_block * s.cache->pool().page_bytes();
        return free + slack >= needed;
    }

    /// Bytes this model could still commit: the budget's free bytes when memory is shared, else
    /// the free blocks of its own cache.
    std::size_t headroom(const model_state& s) const {
        if constexpr (shares_memory) {
            std::size_t committed = 0;
            for (const model_state& other : models_) {
                committed += other.cache->pool().committed_bytes();
            }
            return committed < shared_limit_ ? shared_limit_ - committed : 0;
        } else {
            return s.cache->free_blocks() * s.spec->block_bytes();
        }
    }

    /// Whether memory in use could still be freed for this model (else a refusal is final).
    bool memory_may_come(const model_state& s) const {
        if constexpr (shares_memory) {
            return std::any_of(models_.begin(), models_.end(),
                               [](const model_state& other) { return other.cache->sequence_count() > 0; });
        } else {
            return s.cache->sequence_count() > 0;
        }
    }

    /// Runs a kv_cache call that may be refused for memory, timed; says whether and why it was.
    template <class F>
    refusal memory_call(model_state& s, F&& call) {
        stopwatch w(s.pending_memory_us, s.result.memory_op_us);
        try {
            std::invoke(std::forward<F>(call));
            return refusal::none;
        } catch (const vmmpp::over_quota&) {
            return refusal::quota;
        } catch (const vmmpp::out_of_blocks&) {
            return refusal::blocks;
        } catch (const vmmpp::out_of_memory&) {
            return refusal::memory;
        }
    }

    static void count_refusal(model_result& r, refusal why) {
        switch (why) {
        case refusal::quota: ++r.refused_quota; break;
        case refusal::blocks: ++r.refused_blocks; break;
        case refusal::memory: ++r.refused_memory; break;
        case refusal::none: break;
        }
    }

    // --- measurement ---

    void sample_memory() {
        std::size_t sum = 0;
        for (model_state& s : models_) {
            const std::size_t committed = s.cache->pool().committed_bytes();
            s.committed_area += static_cast<double>(s.committed) * (now_ - last_sample_us_);
            s.committed = committed;
            s.result.peak_committed = std::max(s.result.peak_committed, committed);
            sum += committed;
        }
        committed_area_ += static_cast<double>(committed_) * (now_ - last_sample_us_);
        if (timeline_.empty() || sum != committed_) {
            timeline_.emplace_back(now_, sum);
        }
        committed_ = sum;
        peak_committed_ = std::max(peak_committed_, sum);
        last_sample_us_ = now_;
    }

    run_result collect(double wall_s) {
        run_result r;
        r.mode = mode_;
        r.makespan_us = now_;
        r.peak_committed = peak_committed_;
        r.mean_committed = now_ > 0 ? committed_area_ / now_ : 0;
        timeline_.emplace_back(now_, committed_);  // closes the step function at the end
        r.timeline = downsample(timeline_, now_, options_.timeline_points);
        r.wall_s = wall_s;
        for (std::size_t i = 0; i < trace_.requests.size(); ++i) {
            model_result& m = models_[trace_.requests[i].model].result;
            if (outcomes_[i].first_token_us >= 0) {
                m.ttft_us.push_back(outcomes_[i].first_token_us - trace_.requests[i].arrival_us);
            }
            m.memory_waits += outcomes_[i].waited_for_memory ? 1 : 0;
        }
        for (model_state& s : models_) {
            model_result& m = s.result;
            m.unfinished = s.waiting.size() + s.running.size();
            m.mean_committed = now_ > 0 ? s.committed_area / now_ : 0;
            const vmmpp::pool_stats ps = s.cache->pool().stats();
            m.backing_us = std::chrono::duration<double, std::micro>(ps.driver_time).count();
            m.commits = ps.commits;
            m.decommits = ps.decommits;
            r.models.push_back(std::move(m));
        }
        return r;
    }

    /// At most `points` points: the largest value within each of `points` equal time buckets.
    static std::vector<std::pair<double, std::size_t>> downsample(const std::vector<std::pair<double, std::size_t>>& in,
                                                                  double end_us, std::size_t points) {
        if (in.size() <= points || end_us <= 0) {
            return in;
        }
        std::vector<std::pair<double, std::size_t>> out;
        const double width = end_us / static_cast<double>(points);
        for (const auto& [t, v] : in) {
            const double bucket_start = std::min(static_cast<double>(points - 1), std::floor(t / width)) * width;
            if (out.empty() || out.back().first != bucket_start) {
                out.emplace_back(bucket_start, v);
            } else {
                out.back().second = std::max(out.back().second, v);
            }
        }
        return out;
    }

    std::string mode_;
    const trace& trace_;
    sim_options options_;
    std::size_t shared_limit_;
    std::vector<model_state> models_;
    std::vector<outcome> outcomes_;
    std::priority_queue<std::pair<double, std::uint32_t>, std::vector<std::pair<double, std::uint32_t>>,
                        std::greater<>>
        step_ends_;
    double now_ = 0;
    double last_sample_us_ = 0;
    std::size_t committed_ = 0;
    std::size_t peak_committed_ = 0;
    double committed_area_ = 0;
    std::vector<std::pair<double, std::size_t>> timeline_;
};

/// A cache for `model` holding at most `bytes` of blocks. On a shared_budget configuration it
/// registers with `budget` under the model's name, with `bytes` as its own limit.
template <class Config, class Layout>
std::unique_ptr<vmmpp::kv_cache<Config, Layout>> make_cache(const model_spec& model, std::size_t bytes,
                                                           vmmpp::budget* budget) {
    using cache = vmmpp::kv_cache<Config, Layout>;
    const vmmpp::kv_geometry g = model.geometry_for(bytes);
    if constexpr (std::is_same_v<typename Config::quota_type, vmmpp::shared_budget>) {
        return std::make_unique<cache>(g, typename Config::backing_type::options{}, typename Config::growth_type{},
                                       budget->register_model(model.name, bytes));
    } else {
        return std::make_unique<cache>(g);
    }
}

} // namespace multi_model
