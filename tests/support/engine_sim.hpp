// tests/support/engine_sim.hpp: an engine, as engines use a KV cache, against a model of every
// token's value: sequences admitted, decoded, forked, truncated and freed at random, each on one
// of several engine streams, with the cache's own stream separate. Every token's KV is written
// through slot_mapping (a copy of its value into its slot) and every decode step reads the
// sequence's tokens through its block table (copies out of the slots), queued on the sequence's
// stream; nothing waits for the GPU. At the end the GPU finishes and every read is compared with
// the value the model says the token had when the read was queued.
//
// The engine keeps the rules the README gives: a forked sequence's stream waits for its
// parent's (the fork follows the parent's step); an append given the engine's stream needs no
// more; an append on the cache's stream is preceded by the cache stream waiting for the
// sequence's stream (its copy-on-write reads tokens written there) and followed by the
// sequence's stream waiting for the cache stream (its new blocks are safe for that one).
//
// Used by the fake-driver test (which runs the streams in random order, holding some back) and
// by the GPU test (where they really run concurrently). The host buffers the copies read and
// write come from `host_alloc` (pinned memory on a GPU: copies to pageable memory would make
// the host wait and hide every race).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "vmmpp/driver/api.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/event.hpp"
#include "vmmpp/kv/cache.hpp"

namespace vmmpp_test {

struct engine_sim_result {
    std::size_t reads = 0;       // token reads checked
    std::size_t mismatches = 0;  // reads that saw another value than the model's
    std::size_t steps = 0;
    std::size_t forks = 0, frees = 0, truncates = 0, admits = 0, decodes = 0;
    std::string first_mismatch;
};

template <class Cache>
class engine_sim {
public:
    /// `engine_streams`: the streams the engine's work runs on; `cache_stream` is the cache's
    /// kv_cache_options::stream. `gpu_step` is called after every engine step (the fake driver
    /// runs some streams there; a real GPU runs by itself).
    using host_buffer = std::unique_ptr<std::uint32_t[], std::function<void(std::uint32_t*)>>;
    /// `host_alloc(n)` gives a buffer of n values, for at most n token writes and n token reads.
    engine_sim(Cache& cache, std::vector<CUstream> engine_streams, CUstream cache_stream, std::uint64_t seed,
               std::function<void(std::mt19937_64&)> gpu_step, std::function<host_buffer(std::size_t)> host_alloc,
               std::size_t capacity = std::size_t{1} << 18)
        : cache_(cache),
          streams_(std::move(engine_streams)),
          cache_stream_(cache_stream),
          rng_(seed),
          gpu_step_(std::move(gpu_step)),
          key0_(cache.tensor(0, vmmpp::kv_part::key)),
          capacity_(capacity),
          write_arena_(host_alloc(capacity)),
          read_arena_(host_alloc(capacity)) {}
    /// Plain host memory (the fake driver copies synchronously with its own queue anyway).
    static host_buffer plain_host(std::size_t n) {
        return host_buffer(new std::uint32_t[n](), [](std::uint32_t* p) { delete[] p; });
    }

    /// Runs `steps` random engine steps, then frees everything on random streams.
    void run(std::size_t steps, std::size_t max_live = 12, std::size_t max_tokens = 96) {
        vmmpp::scoped_context current(context_);
        for (std::size_t i = 0; i < steps && writes_ + max_tokens < capacity_ && reads_.size() + max_tokens < capacity_; ++i) {
            step(max_live, max_tokens);
            ++result_.steps;
            gpu_step_(rng_);
        }
        while (!live_.empty()) {
            free_one(live_.begin()->first);
        }
    }

    /// After the GPU finished everything: compares every read with the model.
    engine_sim_result check() {
        for (const auto& r : reads_) {
            const std::uint32_t got = read_arena_[r.slot];
            ++result_.reads;
            if (got != r.expected) {
                if (result_.mismatches++ == 0) {
                    result_.first_mismatch = "sequence " + std::to_string(r.seq) + " token " + std::to_string(r.token) +
                                             ": read " + std::to_string(got) + ", expected " + std::to_string(r.expected);
                }
            }
        }
        return result_;
    }

private:
    struct live_seq {
        CUstream stream;
        std::vector<std::uint32_t> values;  // the model: each token's value
    };
    struct read_record {
        std::size_t slot;
        std::uint32_t expected;
        vmmpp::seq_id seq;
        std::size_t token;
    };

    void step(std::size_t max_live, std::size_t max_tokens) {
        const int op = std::uniform_int_distribution<int>(0, 99)(rng_);
        if (live_.empty() || (op < 15 && live_.size() < max_live)) {
            admit(std::uniform_int_distribution<std::size_t>(1, max_tokens / 2)(rng_));
        } else if (op < 60) {
            decode(pick(), max_tokens);
        } else if (op < 72 && live_.size() < max_live) {
            fork(pick());
        } else if (op < 82) {
            truncate(pick());
        } else {
            free_one(pick());
        }
    }
    vmmpp::seq_id pick() {
        auto it = live_.begin();
        std::advance(it, std::uniform_int_distribution<std::size_t>(0, live_.size() - 1)(rng_));
        return it->first;
    }
    CUstream random_stream() { return streams_[std::uniform_int_distribution<std::size_t>(0, streams_.size() - 1)(rng_)]; }

    /// `to` waits for the work queued on `from` so far.
    void order(CUstream from, CUstream to) {
        if (from == to) {
            return;
        }
        events_.push_back(vmmpp::stream_event::create());
        events_.back().record(from);
        vmmpp::driver::check(vmmpp::driver::get().stream_wait_event(to, events_.back().get(), 0), "cuStreamWaitEvent");
    }

    /// Appends `n` tokens to `seq` with fresh values and writes them through slot_mapping.
    void append_and_write(vmmpp::seq_id seq, live_seq& s, std::size_t n) {
        if (std::uniform_int_distribution<int>(0, 1)(rng_) == 0) {
            cache_.append(seq, n, s.stream);
        } else {
            order(s.stream, cache_stream_);  // a copy-on-write on the cache stream reads tokens written on s.stream
            cache_.append(seq, n);
            order(cache_stream_, s.stream);  // the new blocks are safe for the cache stream
        }
        std::vector<std::int64_t> slots(n);
        cache_.slot_mapping(seq, s.values.size(), slots);
        for (std::size_t i = 0; i < n; ++i) {
            const std::uint32_t v = ++next_value_;
            s.values.push_back(v);
            std::uint32_t* source = &write_arena_[writes_++];  // lives until the end: the copy reads it later
            *source = v;
            vmmpp::driver::check(vmmpp::driver::get().memcpy_async(slot_address(slots[i]),
                                                                    reinterpret_cast<CUdeviceptr>(source),
                                                                    sizeof(std::uint32_t), s.stream),
                                 "cuMemcpyAsync(write token)");
        }
    }
    /// Reads every token of `seq` through its block table, on its stream.
    void read_all(vmmpp::seq_id seq, const live_seq& s) {
        const auto table = cache_.block_table(seq);
        const std::size_t bt = cache_.geometry().block_tokens;
        for (std::size_t t = 0; t < s.values.size(); ++t) {
            const std::int64_t slot = static_cast<std::int64_t>(table[t / bt]) * static_cast<std::int64_t>(bt) +
                                      static_cast<std::int64_t>(t % bt);
            reads_.push_back({reads_.size(), s.values[t], seq, t});
            read_arena_[reads_.back().slot] = 0;
            vmmpp::driver::check(vmmpp::driver::get().memcpy_async(
                                     reinterpret_cast<CUdeviceptr>(&read_arena_[reads_.back().slot]), slot_address(slot),
                                     sizeof(std::uint32_t), s.stream),
                                 "cuMemcpyAsync(read token)");
        }
    }
    [[nodiscard]] CUdeviceptr slot_address(std::int64_t slot) const {
        const std::int64_t bt = cache_.geometry().block_tokens;
        const std::int64_t elements = (slot / bt) * key0_.strides[0] + (slot % bt) * key0_.strides[1];
        return reinterpret_cast<CUdeviceptr>(static_cast<std::byte*>(key0_.data) + elements * 2);  // f16/bf16 elements
    }

    void admit(std::size_t n) {
        const vmmpp::seq_id seq = cache_.add_sequence();
        live_seq& s = live_.emplace(seq, live_seq{random_stream(), {}}).first->second;
        append_and_write(seq, s, n);
        ++result_.admits;
    }
    void decode(vmmpp::seq_id seq, std::size_t max_tokens) {
        live_seq& s = live_.at(seq);
        read_all(seq, s);
        if (s.values.size() < max_tokens) {
            append_and_write(seq, s, 1);
        }
        ++result_.decodes;
    }
    void fork(vmmpp::seq_id parent) {
        const vmmpp::seq_id child = cache_.fork(parent);
        live_seq c{random_stream(), live_.at(parent).values};
        order(live_.at(parent).stream, c.stream);  // the fork follows the parent's step
        live_.emplace(child, std::move(c));
        ++result_.forks;
    }
    void truncate(vmmpp::seq_id seq) {
        live_seq& s = live_.at(seq);
        const std::size_t keep = std::uniform_int_distribution<std::size_t>(0, s.values.size())(rng_);
        cache_.truncate(seq, keep, s.stream);
        s.values.resize(keep);
        ++result_.truncates;
    }
    void free_one(vmmpp::seq_id seq) {
        cache_.free(seq, live_.at(seq).stream);
        live_.erase(seq);
        ++result_.frees;
    }

    Cache& cache_;
    std::vector<CUstream> streams_;
    CUstream cache_stream_;
    std::mt19937_64 rng_;
    std::function<void(std::mt19937_64&)> gpu_step_;
    vmmpp::kv_tensor key0_;
    vmmpp::primary_context context_{0};
    std::map<vmmpp::seq_id, live_seq> live_;
    std::size_t capacity_;
    host_buffer write_arena_;  // values being written, one each (the copies read them later)
    host_buffer read_arena_;   // what each read got
    std::size_t writes_ = 0;
    std::vector<read_record> reads_;
    std::deque<vmmpp::stream_event> events_;  // kept until the end: the waits may still refer to them
    std::uint32_t next_value_ = 0;
    engine_sim_result result_;
};

} // namespace vmmpp_test
