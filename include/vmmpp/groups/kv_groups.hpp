// vmmpp/groups/kv_groups.hpp: kv_groups<Groups...>, a model whose layers are not all alike
// (Gemma 3's 5 sliding : 1 full, gpt-oss, Qwen3-Next's and Jamba's state-space layers beside
// attention): one sequence id space over groups of layers that each have their own geometry,
// layout and pool (vmmpp/groups/kv_group.hpp). Their pools share a budget as any pools do: give
// each the same quota (a shared_budget share, or a process_quota), and the model's memory is one
// number however its groups split it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <exception>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "vmmpp/error.hpp"
#include "vmmpp/groups/kv_group.hpp"
#include "vmmpp/kv/cache_options.hpp"

namespace vmmpp {

/// The sequences of one model over its layer groups (each a kv_group: attention_group,
/// window_group, state_group). A sequence is added to, grown in, forked in and freed from every
/// group at once; handle<I>(seq) is its handle in group I (a kv_cache sequence id for block
/// tables and slot mappings, a state slot). The groups are the caller's and must outlive this.
///
/// Thread safety: as a standard container. Guarantee: strong for add_sequence, append and fork
/// (a group's refusal undoes what the groups before it did), except as the groups' own calls say
/// (a CUDA failure while giving memory back).
template <kv_group... Groups>
class kv_groups {
public:
    using handle_tuple = std::tuple<typename Groups::handle...>;

    explicit kv_groups(Groups&... groups) noexcept : groups_(groups...) {}
    kv_groups(const kv_groups&) = delete;
    kv_groups& operator=(const kv_groups&) = delete;

    /// A new, empty sequence in every group (a state group acquires its slot: work queued on
    /// `stream` after the call may write it).
    /// Throws: what a group's add throws (out_of_blocks, over_quota, ...): nothing changed.
    seq_id add_sequence(cudaStream_t stream) {
        handle_tuple h = started(stream);
        try {
            sequences_.emplace(next_id_, sequence{h, 0});
        } catch (...) {
            free_first(h, group_count, stream);
            throw;
        }
        return next_id_++;
    }

    /// Appends `n_tokens` tokens to `seq` in every group, then lets each group act on the new
    /// length before the engine queues the step that writes them on `stream`: a window group lets
    /// go of the blocks that step does not read, after the work queued on `stream` so far
    /// (sliding_window::release_unread).
    /// Throws: invalid_argument (unknown sequence), what a group's append throws (nothing changed:
    /// the groups before it are truncated back); a cuda_error from a window's release (the append
    /// has taken effect).
    void append(seq_id seq, std::size_t n_tokens, cudaStream_t stream) {
        sequence& s = find(seq);
        std::size_t appended = 0;  // groups that took the tokens
        try {
            for_each_group([&]<std::size_t I>(auto& g) {
                g.append(std::get<I>(s.handles), n_tokens, stream);
                ++appended;
            });
        } catch (...) {
            for_each_group([&]<std::size_t I>(auto& g) {
                if (I < appended) {
                    try {
                        g.truncate(std::get<I>(s.handles), s.tokens, stream);
                    } catch (...) {
                        // only a failed give-back of what the append took (the pool retired it)
                    }
                }
            });
            throw;
        }
        const std::size_t first_new = s.tokens;
        s.tokens += n_tokens;
        for_each_group([&]<std::size_t I>(auto& g) { g.after_append(std::get<I>(s.handles), first_new, stream); });
    }

    /// A new sequence sharing `seq`'s tokens in every group (attention blocks by reference, a
    /// state copied on `stream`).
    /// Throws: invalid_argument (unknown sequence), what a group's fork throws: nothing changed.
    seq_id fork(seq_id seq, cudaStream_t stream) {
        const sequence& parent = find(seq);
        handle_tuple child{};
        std::size_t forked = 0;
        try {
            for_each_group([&]<std::size_t I>(auto& g) {
                std::get<I>(child) = g.fork(std::get<I>(parent.handles), stream);
                ++forked;
            });
            sequences_.emplace(next_id_, sequence{child, parent.tokens});
        } catch (...) {
            free_first(child, forked, stream);
            throw;
        }
        return next_id_++;
    }

    /// Frees `seq` in every group, each in stream order after the work queued on `stream`.
    /// Throws: invalid_argument (unknown sequence; nothing changed); the first error of a
    /// group's free, after every group freed it (a failed give-back: the pool retired it).
    void free(seq_id seq, cudaStream_t stream) {
        auto it = sequences_.find(seq);
        if (it == sequences_.end()) {
            throw unknown_sequence(seq);
        }
        const handle_tuple h = it->second.handles;
        sequences_.erase(it);
        std::exception_ptr first;
        for_each_group([&]<std::size_t I>(auto& g) {
            try {
                g.free(std::get<I>(h), stream);
            } catch (...) {
                if (!first) first = std::current_exception();
            }
        });
        if (first) {
            std::rethrow_exception(first);
        }
    }

    /// The sequence's handle in group I (e.g. its kv_cache sequence id, for block_table).
    template <std::size_t I>
    [[nodiscard]] auto handle(seq_id seq) const {
        return std::get<I>(find(seq).handles);
    }
    template <std::size_t I>
    [[nodiscard]] auto& group() const noexcept {
        return std::get<I>(groups_);
    }
    [[nodiscard]] std::size_t tokens(seq_id seq) const { return find(seq).tokens; }
    [[nodiscard]] bool contains(seq_id seq) const noexcept { return sequences_.contains(seq); }
    [[nodiscard]] std::size_t sequence_count() const noexcept { return sequences_.size(); }
    static constexpr std::size_t group_count = sizeof...(Groups);

private:
    struct sequence {
        handle_tuple handles;
        std::size_t tokens = 0;
    };

    static invalid_argument unknown_sequence(seq_id seq) {
        return invalid_argument("kv_groups: unknown sequence " + std::to_string(seq) + " (never added, or freed)");
    }
    sequence& find(seq_id seq) {
        auto it = sequences_.find(seq);
        if (it == sequences_.end()) throw unknown_sequence(seq);
        return it->second;
    }
    const sequence& find(seq_id seq) const {
        auto it = sequences_.find(seq);
        if (it == sequences_.end()) throw unknown_sequence(seq);
        return it->second;
    }

    /// Calls f.template operator()<I>(group I) for each group in order.
    template <class F>
    void for_each_group(F&& f) {
        [&]<std::size_t... I>(std::index_sequence<I...>) { (f.template operator()<I>(std::get<I>(groups_)), ...); }(
            std::index_sequence_for<Groups...>{});
    }

    handle_tuple started(cudaStream_t stream) {
        handle_tuple h{};
        std::size_t added = 0;
        try {
            for_each_group([&]<std::size_t I>(auto& g) {
                std::get<I>(h) = g.add(stream);
                ++added;
            });
        } catch (...) {
            free_first(h, added, stream);
            throw;
        }
        return h;
    }
    /// Frees the sequence in the first `count` groups (undoing an add or a fork); never throws.
    void free_first(const handle_tuple& h, std::size_t count, cudaStream_t stream) noexcept {
        for_each_group([&]<std::size_t I>(auto& g) {
            if (I < count) {
                try {
                    g.free(std::get<I>(h), stream);
                } catch (...) {
                    // only a failed give-back of what it took (the pool retired it)
                }
            }
        });
    }

    std::tuple<Groups&...> groups_;
    std::map<seq_id, sequence> sequences_;
    seq_id next_id_ = 0;
};

}  // namespace vmmpp
