// The reference model of one kv_cache for the randomized stress test: it predicts, independently
// of the library, every block id a cache hands out (lowest free first), every reference count,
// which pages and growth units are committed, and whether an operation must be refused (for
// lack of blocks, by the model's or the global quota, or by an injected commit fault), then
// compares the cache with the prediction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "reliability/support/rigs.hpp"

namespace vmmpp_rel {

/// A check failed: what, where. Thrown so a worker thread can hand it to the main thread.
struct check_failure : std::logic_error {
    using std::logic_error::logic_error;
};

/// How an operation ended (or must end).
enum class outcome { ok, out_of_blocks, over_model_quota, over_global_quota, out_of_memory };

inline const char* name_of(outcome o) {
    switch (o) {
    case outcome::ok: return "ok";
    case outcome::out_of_blocks: return "out_of_blocks";
    case outcome::over_model_quota: return "over_quota(model)";
    case outcome::over_global_quota: return "over_quota(global)";
    case outcome::out_of_memory: return "out_of_memory";
    }
    return "?";
}

/// Counts of what a model did.
struct op_counts {
    std::uint64_t ops = 0, adds = 0, appends = 0, forks = 0, truncates = 0, frees = 0;
    std::uint64_t refused[5] = {};  // by outcome
    std::uint64_t cow = 0;
    std::size_t peak_committed = 0, peak_blocks = 0;
};

/// One model under test, type-erased so models of different cache types run side by side.
class stress_model {
public:
    virtual ~stress_model() = default;
    /// One random operation, checked against the model.
    virtual void step(std::mt19937_64& rng) = 0;
    /// Full comparison: every sequence, every reference count, the pool; with `values`, every
    /// token's bytes too.
    virtual void check(bool values) const = 0;
    /// Bytes the model predicts the cache's pool has committed.
    [[nodiscard]] virtual std::size_t predicted_committed() const = 0;
    [[nodiscard]] virtual const std::string& name() const = 0;
    [[nodiscard]] virtual std::size_t limit() const = 0;
    [[nodiscard]] virtual const op_counts& counts() const = 0;
};

/// How the models see the budget they share. In a single-threaded run every model's predicted
/// committed bytes are known, so global refusals are predicted exactly; with one thread per
/// model they are not, and a global refusal is accepted wherever it could happen.
struct global_view {
    std::size_t limit = 0;
    const std::vector<stress_model*>* models = nullptr;  // null: not predictable
};

/// The reference model of one kv_cache<Config, Layout> whose backing is fault_injecting and
/// whose quota is a shared_budget registration.
template <class Cache>
class kv_reference final : public stress_model {
public:
    using layout = typename Cache::layout_type;

    kv_reference(std::string name, Cache& cache, std::shared_ptr<vmmpp::fault_plan> plan, std::size_t model_limit,
                 global_view global, std::size_t max_sequences = 32)
        : name_(std::move(name)), cache_(cache), plan_(std::move(plan)), limit_(model_limit), global_(global),
          max_sequences_(max_sequences), g_(cache.geometry()), page_bytes_(cache.pool().page_bytes()),
          unit_pages_(cache.pool().unit_bytes() / page_bytes_), pages_(cache.pool().capacity() / page_bytes_),
          units_((pages_ + unit_pages_ - 1) / unit_pages_), refs_(g_.max_blocks, 0), page_holds_(pages_, 0),
          unit_held_pages_(units_, 0) {
        for (std::uint32_t b = 0; b < g_.max_blocks; ++b) {
            free_.insert(static_cast<std::int32_t>(b));
        }
    }

    [[nodiscard]] std::size_t predicted_committed() const override { return committed_; }
    [[nodiscard]] const std::string& name() const override { return name_; }
    [[nodiscard]] std::size_t limit() const override { return limit_; }
    [[nodiscard]] const op_counts& counts() const override { return counts_; }

    void step(std::mt19937_64& rng) override {
        ++counts_.ops;
        // Phases: a model grows until its limits bite, then shrinks, again and again, so memory
        // swings between empty and full and every refusal path runs.
        if (--phase_left_ == 0) {
            growing_ = !growing_;
            phase_left_ = 200 + rng() % 2000;
        }
        const unsigned op = static_cast<unsigned>(rng() % 100);
        const unsigned append_below = growing_ ? 70 : 40, fork_below = append_below + 10,
                       truncate_below = growing_ ? 88 : 75;
        if (seqs_.empty() || op < 6) {
            if (seqs_.size() < max_sequences_) {
                do_add();
            }
            return;
        }
        auto it = seqs_.begin();
        std::advance(it, static_cast<std::ptrdiff_t>(rng() % seqs_.size()));
        const vmmpp::seq_id id = it->first;
        if (op < append_below) {
            const bool long_append = rng() % 8 == 0;  // (two statements: operands of % are unsequenced)
            const std::size_t n = 1 + rng() % (long_append ? 160 : 8);
            do_append(id, n, rng);
        } else if (op < fork_below) {
            if (seqs_.size() < max_sequences_) {
                do_fork(id);
            }
        } else if (op < truncate_below) {
            const std::size_t tokens = it->second.values.size();
            do_truncate(id, tokens == 0 ? 0 : rng() % (tokens + 1));
        } else {
            do_free(id);
        }
    }

    void check(bool values) const override {
        if (cache_.sequence_count() != seqs_.size()) {
            fail("sequence count " + std::to_string(cache_.sequence_count()) + ", model " +
                 std::to_string(seqs_.size()));
        }
        for (const auto& [id, s] : seqs_) {
            check_sequence(id, s);
        }
        for (std::uint32_t b = 0; b < g_.max_blocks; ++b) {
            if (cache_.block_refs(static_cast<std::int32_t>(b)) != refs_[b]) {
                fail("block " + std::to_string(b) + " has " +
                     std::to_string(cache_.block_refs(static_cast<std::int32_t>(b))) + " references, model " +
                     std::to_string(refs_[b]));
            }
        }
        check_memory();
        std::size_t held = 0;
        for (auto h : page_holds_) {
            held += h != 0;
        }
        const auto st = cache_.pool().stats();
        if (st.held_pages != held || st.idle_units != 0) {
            fail("held pages " + std::to_string(st.held_pages) + " (model " + std::to_string(held) + "), idle units " +
                 std::to_string(st.idle_units));
        }
        for (std::size_t u = 0; u < units_; ++u) {
            if (cache_.pool().is_unit_committed(u) != (unit_held_pages_[u] != 0)) {
                fail("unit " + std::to_string(u) + " committed " + std::to_string(cache_.pool().is_unit_committed(u)));
            }
        }
        if (values) {
            for (const auto& [id, s] : seqs_) {
                for (std::size_t t = 0; t < s.values.size(); ++t) {
                    if (!token_holds(cache_, slot(s, t), s.values[t])) {
                        fail("token " + std::to_string(t) + " of sequence " + std::to_string(id) + " lost its value");
                    }
                }
            }
        }
    }

private:
    struct sequence {
        std::vector<std::uint16_t> values;  // one per token
        std::vector<std::int32_t> blocks;   // the block ids the model predicts
    };

    [[noreturn]] void fail(const std::string& what) const {
        throw check_failure(name_ + ", its operation " + std::to_string(counts_.ops) + " (" + last_op_ + "): " + what);
    }

    [[nodiscard]] std::int64_t slot(const sequence& s, std::size_t t) const {
        return std::int64_t{s.blocks[t / g_.block_tokens]} * g_.block_tokens +
               static_cast<std::int64_t>(t % g_.block_tokens);
    }
    [[nodiscard]] std::size_t unit_bytes(std::size_t u) const {
        return (std::min(pages_, (u + 1) * unit_pages_) - u * unit_pages_) * page_bytes_;
    }

    /// Calls f(unit) for the units under block `b`'s pieces, piece by piece in the layout's
    /// order, each piece's units ascending: the order in which the pool commits them.
    template <class F>
    void for_each_unit(std::int32_t b, F&& f) const {
        layout::for_each_piece(g_, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
            for (std::size_t u = off / page_bytes_ / unit_pages_; u <= (off + bytes - 1) / page_bytes_ / unit_pages_;
                 ++u) {
                f(u);
            }
        });
    }
    /// Holds (+1) or lets go of (-1) block `b`'s pages, as the cache asks the pool to.
    void hold(std::int32_t b, int delta) {
        layout::for_each_piece(g_, static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
            for (std::size_t p = off / page_bytes_; p <= (off + bytes - 1) / page_bytes_; ++p) {
                const std::size_t u = p / unit_pages_;
                if (delta > 0) {
                    if (page_holds_[p]++ == 0 && unit_held_pages_[u]++ == 0) {
                        committed_ += unit_bytes(u);
                    }
                } else if (--page_holds_[p] == 0 && --unit_held_pages_[u] == 0) {
                    committed_ -= unit_bytes(u);
                }
            }
        });
    }
    void take(std::int32_t b) {
        free_.erase(b);
        refs_[static_cast<std::size_t>(b)] = 1;
        hold(b, +1);
    }
    void drop(std::int32_t b) {
        if (--refs_[static_cast<std::size_t>(b)] == 0) {
            free_.insert(b);
            hold(b, -1);
        }
    }

    void check_sequence(vmmpp::seq_id id, const sequence& s) const {
        if (!cache_.contains(id)) {
            fail("sequence " + std::to_string(id) + " is gone");
        }
        const auto table = cache_.block_table(id);
        if (cache_.tokens(id) != s.values.size() || table.size() != s.blocks.size() ||
            !std::equal(table.begin(), table.end(), s.blocks.begin())) {
            std::string got, want;
            for (auto b : table) got += std::to_string(b) + " ";
            for (auto b : s.blocks) want += std::to_string(b) + " ";
            fail("sequence " + std::to_string(id) + ": " + std::to_string(cache_.tokens(id)) + " tokens in [ " + got +
                 "], model " + std::to_string(s.values.size()) + " in [ " + want + "]");
        }
    }
    /// The pool, the backing and the budget registration hold exactly the predicted bytes.
    void check_memory() const {
        const auto& pool = cache_.pool();
        const std::size_t committed = pool.committed_bytes();
        const std::size_t model = pool.quota().stats().committed;
        if (committed != committed_ || pool.backing().committed_bytes() != committed_ || model != committed_) {
            fail("committed: pool " + std::to_string(committed) + ", backing " +
                 std::to_string(pool.backing().committed_bytes()) + ", budget " + std::to_string(model) + "; model " +
                 std::to_string(committed_));
        }
        if (committed > limit_) {
            fail("committed " + std::to_string(committed) + " over the model's limit " + std::to_string(limit_));
        }
        if (cache_.used_blocks() != g_.max_blocks - free_.size()) {
            fail("used blocks " + std::to_string(cache_.used_blocks()) + ", model " +
                 std::to_string(g_.max_blocks - free_.size()));
        }
    }
    /// After a refusal: the sequence, the blocks and the memory are as the model has them.
    void check_unchanged(vmmpp::seq_id id) const {
        check_sequence(id, seqs_.at(id));
        check_memory();
        if (plan_->commit_armed()) {
            fail("an injected fault was left armed");
        }
    }

    void do_add() {
        last_op_ = "add";
        const vmmpp::seq_id id = cache_.add_sequence();
        if (id != next_id_) {
            fail("new sequence id " + std::to_string(id) + ", model " + std::to_string(next_id_));
        }
        ++next_id_;
        seqs_[id];
        ++counts_.adds;
        check_memory();
    }

    /// What append(id, n) must do: which fresh blocks it takes (lowest free first, the copy
    /// target first), and how it must end, simulating the pool's unit commits in order (quota
    /// first: the model's limit, then the global one; then the backing, where the injected fault
    /// waits at commit `fault_at` of this call).
    struct append_plan {
        outcome result = outcome::ok;
        bool cow = false;
        std::vector<std::int32_t> fresh;
        std::uint64_t commits = 0;  // backing commits made (the failing one included)
    };
    append_plan predict_append(const sequence& s, std::size_t n, std::uint64_t fault_at) const {
        append_plan p;
        const std::size_t max_tokens = std::size_t{g_.max_blocks} * g_.block_tokens;
        if (n > max_tokens - s.values.size()) {
            p.result = outcome::out_of_blocks;
            return p;
        }
        const std::size_t total = g_.blocks_for(s.values.size() + n);
        p.cow = s.values.size() % g_.block_tokens != 0 && refs_[static_cast<std::size_t>(s.blocks.back())] > 1;
        const std::size_t fresh = total - s.blocks.size() + (p.cow ? 1 : 0);
        if (fresh > free_.size()) {
            p.result = outcome::out_of_blocks;
            return p;
        }
        for (auto it = free_.begin(); p.fresh.size() < fresh; ++it) {
            p.fresh.push_back(*it);
        }
        std::size_t model_committed = committed_;
        std::size_t global_committed = 0;
        const bool global_known = global_.models != nullptr;
        if (global_known) {
            for (const stress_model* m : *global_.models) {
                global_committed += m->predicted_committed();
            }
        }
        // The quota is charged once for the whole append (elastic_pool::prepay), before any commit:
        // the model's limit first, then the global one; then the units commit one by one.
        std::set<std::size_t> taken;
        std::size_t needed = 0;
        for (std::int32_t b : p.fresh) {
            for_each_unit(b, [&](std::size_t u) {
                if (unit_held_pages_[u] == 0 && taken.insert(u).second) {
                    needed += unit_bytes(u);
                }
            });
        }
        if (needed > limit_ - model_committed) {
            p.result = outcome::over_model_quota;
        } else if (global_known && needed > global_.limit - global_committed) {
            p.result = outcome::over_global_quota;
        } else if (fault_at != 0 && fault_at <= taken.size()) {
            p.commits = fault_at;
            p.result = outcome::out_of_memory;
        } else {
            p.commits = taken.size();
        }
        return p;
    }

    void do_append(vmmpp::seq_id id, std::size_t n, std::mt19937_64& rng) {
        sequence& s = seqs_.at(id);
        append_plan p = predict_append(s, n, 0);
        // One append in four that commits makes one of its commits fail (one in 32 arms a fault
        // just past its last commit, which must not fire).
        std::uint64_t fault_at = 0;
        if (p.result == outcome::ok && p.commits > 0) {
            if (rng() % 4 == 0) {
                fault_at = 1 + rng() % p.commits;
            } else if (rng() % 8 == 0) {
                fault_at = p.commits + 1;
            }
        }
        if (fault_at != 0) {
            p = predict_append(s, n, fault_at);
            plan_->fail_commit_in(fault_at);
        }
        last_op_ = "append(" + std::to_string(id) + ", " + std::to_string(n) +
                   (fault_at != 0 ? ") with commit " + std::to_string(fault_at) + " failing" : ")");
        outcome got = outcome::ok;
        std::string what;
        try {
            const auto r = cache_.append(id, n);
            if (r.first != s.values.size() || r.count != n) {
                fail("append returned [" + std::to_string(r.first) + ", +" + std::to_string(r.count) + ")");
            }
        } catch (const vmmpp::out_of_blocks& e) {
            got = outcome::out_of_blocks;
            what = e.what();
        } catch (const vmmpp::over_quota& e) {
            got = e.which() == "global" ? outcome::over_global_quota : outcome::over_model_quota;
            what = e.what();
            if (got == outcome::over_model_quota && e.which() != "model " + name_) {
                fail("refused by another model's limit: " + what);
            }
        } catch (const vmmpp::out_of_memory& e) {
            got = outcome::out_of_memory;
            what = e.what();
        }
        plan_->disarm();  // a fault the append did not reach (it committed less) is not left over
        if (got != p.result) {
            // With one thread per model the global limit moves under us: a global refusal may
            // come first wherever a commit was still to come.
            const bool global_unknown = global_.models == nullptr;
            if (!(global_unknown && got == outcome::over_global_quota && p.result != outcome::out_of_blocks)) {
                fail(std::string("append ended ") + name_of(got) + (what.empty() ? "" : " (" + what + ")") +
                     ", model predicts " + name_of(p.result));
            }
        }
        if (got != outcome::ok) {
            ++counts_.refused[static_cast<int>(got)];
            check_unchanged(id);
            return;
        }
        ++counts_.appends;
        const std::size_t old = s.values.size();
        auto fresh = p.fresh.begin();
        if (p.cow) {
            drop(s.blocks.back());  // still referenced by another sequence: not freed
            take(*fresh);
            s.blocks.back() = *fresh++;
            ++counts_.cow;
        }
        for (; fresh != p.fresh.end(); ++fresh) {
            take(*fresh);
            s.blocks.push_back(*fresh);
        }
        std::vector<std::int64_t> slots(n);
        cache_.slot_mapping(id, old, slots);
        for (std::size_t i = 0; i < n; ++i) {
            s.values.push_back(next_value_);
            if (slots[i] != slot(s, old + i)) {
                fail("slot of token " + std::to_string(old + i) + " is " + std::to_string(slots[i]) + ", model " +
                     std::to_string(slot(s, old + i)));
            }
            write_token(cache_, slots[i], next_value_++);
        }
        if (cache_.cow_copies() != counts_.cow) {
            fail("copy-on-write copies " + std::to_string(cache_.cow_copies()) + ", model " + std::to_string(counts_.cow));
        }
        check_sequence(id, s);
        check_memory();
        counts_.peak_committed = std::max(counts_.peak_committed, committed_);
        counts_.peak_blocks = std::max(counts_.peak_blocks, std::size_t{g_.max_blocks} - free_.size());
    }

    void do_fork(vmmpp::seq_id id) {
        last_op_ = "fork(" + std::to_string(id) + ")";
        const vmmpp::seq_id child = cache_.fork(id);
        if (child != next_id_) {
            fail("forked sequence id " + std::to_string(child) + ", model " + std::to_string(next_id_));
        }
        ++next_id_;
        sequence copy = seqs_.at(id);
        for (std::int32_t b : copy.blocks) {
            ++refs_[static_cast<std::size_t>(b)];
        }
        check_sequence(child, seqs_[child] = std::move(copy));
        ++counts_.forks;
        check_memory();
    }

    void do_truncate(vmmpp::seq_id id, std::size_t keep) {
        last_op_ = "truncate(" + std::to_string(id) + ", " + std::to_string(keep) + ")";
        cache_.truncate(id, keep);
        sequence& s = seqs_.at(id);
        const std::size_t kept_blocks = g_.blocks_for(keep);
        for (std::size_t i = kept_blocks; i < s.blocks.size(); ++i) {
            drop(s.blocks[i]);
        }
        s.blocks.resize(kept_blocks);
        s.values.resize(keep);
        ++counts_.truncates;
        check_sequence(id, s);
        check_memory();
    }

    void do_free(vmmpp::seq_id id) {
        last_op_ = "free(" + std::to_string(id) + ")";
        cache_.free(id);
        for (std::int32_t b : seqs_.at(id).blocks) {
            drop(b);
        }
        seqs_.erase(id);
        ++counts_.frees;
        if (cache_.contains(id)) {
            fail("freed sequence still there");
        }
        check_memory();
    }

    std::string name_;
    Cache& cache_;
    std::shared_ptr<vmmpp::fault_plan> plan_;
    std::size_t limit_;
    global_view global_;
    std::size_t max_sequences_;
    vmmpp::kv_geometry g_;
    std::size_t page_bytes_, unit_pages_, pages_, units_;

    std::map<vmmpp::seq_id, sequence> seqs_;
    std::vector<std::uint32_t> refs_;             // per block
    std::set<std::int32_t> free_;                 // free block ids
    std::vector<std::uint32_t> page_holds_;       // per page: live block pieces over it
    std::vector<std::uint32_t> unit_held_pages_;  // per unit: its pages with holds
    std::size_t committed_ = 0;                   // bytes of units with a held page
    vmmpp::seq_id next_id_ = 0;
    std::uint16_t next_value_ = 1;
    bool growing_ = true;
    std::uint64_t phase_left_ = 1000;
    op_counts counts_;
    std::string last_op_;
};

} // namespace vmmpp_rel
