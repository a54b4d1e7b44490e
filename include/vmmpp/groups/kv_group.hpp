// vmmpp/groups/kv_group.hpp: the concept kv_group, one group of layers of a model as kv_groups
// (vmmpp/groups/kv_groups.hpp) drives it, and its three models: full attention (a kv_cache),
// sliding-window attention (a kv_cache with a sliding_window) and state-space layers (state_slots).
// Each group has its own geometry, layout and pool; the caches and slots stay the engine's, to
// read tables, tensors and addresses from.
#pragma once

#include <cuda_runtime_api.h>

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "vmmpp/groups/sliding_window.hpp"
#include "vmmpp/groups/state_slots.hpp"
#include "vmmpp/kv/cache_options.hpp"

namespace vmmpp {

/// One group of layers: what a sequence is there (its handle: a sequence id, a slot), and what
/// happens to it as the model's sequence starts, grows, forks and ends. append may throw and
/// leave the group as it was (strong); truncate undoes an append of the same call; once every
/// group took its tokens, after_append(h, first_new_token, stream) runs, before the engine
/// queues the step that writes them (a window releases what that step does not read).
template <class G>
concept kv_group = requires(G& g, const typename G::handle h, std::size_t n, cudaStream_t s) {
    typename G::handle;
    { g.add(s) } -> std::same_as<typename G::handle>;
    { g.append(h, n, s) };
    { g.truncate(h, n, s) };
    { g.after_append(h, n, s) };
    { g.fork(h, s) } -> std::same_as<typename G::handle>;
    { g.free(h, s) };
};

/// Full-attention layers: every token's K and V, in `Cache` (a kv_cache), to the sequence's end.
template <class Cache>
class attention_group {
public:
    using handle = seq_id;
    explicit attention_group(Cache& cache) noexcept : cache_(cache) {}

    handle add(cudaStream_t) { return cache_.add_sequence(); }
    void append(handle h, std::size_t n, cudaStream_t s) { (void)cache_.append(h, n, s); }
    void truncate(handle h, std::size_t n, cudaStream_t s) { cache_.truncate(h, n, s); }
    void after_append(handle, std::size_t, cudaStream_t) noexcept {}
    handle fork(handle h, cudaStream_t) { return cache_.fork(h); }
    void free(handle h, cudaStream_t s) { cache_.free(h, s); }
    [[nodiscard]] Cache& cache() const noexcept { return cache_; }

private:
    Cache& cache_;
};

/// Sliding-window layers: as attention_group, and at each append the blocks that the step
/// writing the new tokens does not read go back (sliding_window::release_unread, stream order).
template <class Cache>
class window_group {
public:
    using handle = seq_id;
    /// Takes the window's null block from `cache` (see sliding_window).
    window_group(Cache& cache, std::size_t window_tokens) : window_(cache, window_tokens) {}

    handle add(cudaStream_t) { return window_.cache().add_sequence(); }
    void append(handle h, std::size_t n, cudaStream_t s) { (void)window_.cache().append(h, n, s); }
    void truncate(handle h, std::size_t n, cudaStream_t s) { window_.cache().truncate(h, n, s); }
    void after_append(handle h, std::size_t first_new, cudaStream_t s) { (void)window_.release_unread(h, first_new, s); }
    handle fork(handle h, cudaStream_t) { return window_.cache().fork(h); }
    void free(handle h, cudaStream_t s) { window_.cache().free(h, s); }
    [[nodiscard]] Cache& cache() const noexcept { return window_.cache(); }
    [[nodiscard]] const sliding_window<Cache>& window() const noexcept { return window_; }

private:
    sliding_window<Cache> window_;
};

/// State-space layers (Mamba, gated delta net): one fixed-size slot per sequence in `Slots`
/// (a state_slots), whatever its length; a fork copies the state.
template <class Slots>
class state_group {
public:
    using handle = std::uint32_t;
    explicit state_group(Slots& slots) noexcept : slots_(slots) {}

    handle add(cudaStream_t s) { return slots_.acquire(s); }
    void append(handle, std::size_t, cudaStream_t) noexcept {}
    void truncate(handle, std::size_t, cudaStream_t) noexcept {}
    void after_append(handle, std::size_t, cudaStream_t) noexcept {}
    handle fork(handle h, cudaStream_t s) { return slots_.fork(h, s); }
    void free(handle h, cudaStream_t s) { slots_.release(h, s); }
    [[nodiscard]] Slots& slots() const noexcept { return slots_; }

private:
    Slots& slots_;
};

}  // namespace vmmpp
