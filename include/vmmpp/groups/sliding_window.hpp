// vmmpp/groups/sliding_window.hpp: sliding_window<Cache>, the layers of a model that attend to the
// last `window` tokens only (Gemma 3's local layers, gpt-oss's and Mistral's sliding ones): their
// kv_cache gives back the blocks a sequence's window has left while the sequence lives, instead
// of keeping every token's K and V to the end as a full-attention cache must.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache_options.hpp"

namespace vmmpp {

/// The sliding window of one kv_cache (a paged layout: its blocks can be shared). Its null block,
/// a block of the cache this object holds, stands in the block tables for every block that left
/// a window (kv_cache::release_leading_blocks), so a table keeps one entry per block of the
/// sequence and kernels index it as before; a windowed kernel never reads positions before
/// tokens - window, and the null block's bytes are whatever they are. vLLM's null block, the
/// same idea.
///
/// When: a query at position q reads positions (q - window, q]. Before queueing a step whose new
/// tokens start at position p (a prefill's first queries read far back), release_unread(seq, p,
/// stream) lets go of what no query of it reads; after queueing it, slide(seq, stream) of what
/// no later query reads. Either way the blocks go back after the work queued on `stream` and
/// every earlier reader, never under them.
///
/// The cache must outlive the window. Thread safety: as the cache's.
template <class Cache>
class sliding_window {
public:
    /// A window of `window_tokens` tokens over `cache`; takes its null block (kv_cache::take_block
    /// on `stream`).
    /// Throws: invalid_argument (a zero window, a layout that cannot share blocks), and what
    /// take_block throws (out_of_blocks, over_quota, out_of_memory, ...).
    sliding_window(Cache& cache, std::size_t window_tokens, cudaStream_t stream)
        : cache_(cache), window_(checked_window(window_tokens)), null_block_(cache.take_block(stream)) {}
    /// sliding_window(cache, window_tokens, the cache's stream).
    sliding_window(Cache& cache, std::size_t window_tokens) : sliding_window(cache, window_tokens, cache.stream()) {}

    /// Lets go of the null block (its memory goes back once the last sequence holding it is gone).
    ~sliding_window() {
        try {
            cache_.release_block(null_block_, cache_.stream());
        } catch (...) {
            // a sleeping cache or a failed fence: the block stays live until the cache goes
        }
    }
    sliding_window(const sliding_window&) = delete;
    sliding_window& operator=(const sliding_window&) = delete;

    /// Releases the blocks of `seq` that no query at position `first_query` or later reads
    /// (those wholly before first_query + 1 - window_tokens()), in stream order: after the work
    /// queued on `stream` and every earlier reader. Returns how many went (0 when none left the
    /// window since the last call). Before queueing a step whose first new token is at position
    /// p, release_unread(seq, p, stream) releases what that step does not read.
    /// Throws: invalid_argument (unknown sequence, `first_query` beyond its tokens), as
    /// kv_cache::release_leading_blocks: nothing changed.
    std::size_t release_unread(seq_id seq, std::size_t first_query, cudaStream_t stream) {
        return cache_.release_leading_blocks(seq, blocks_unread(seq, first_query), null_block_, stream);
    }
    /// After queueing the step that wrote the sequence's newest tokens on `stream`: releases the
    /// blocks that no later query reads (release_unread at the sequence's length).
    std::size_t slide(seq_id seq, cudaStream_t stream) { return release_unread(seq, cache_.tokens(seq), stream); }
    /// slide(seq, the cache's stream).
    std::size_t slide(seq_id seq) { return slide(seq, cache_.stream()); }

    /// Blocks of `seq` that no query at `first_query` or later reads (released or not).
    /// Throws: invalid_argument (unknown sequence, `first_query` beyond its tokens).
    [[nodiscard]] std::size_t blocks_unread(seq_id seq, std::size_t first_query) const {
        const std::size_t tokens = cache_.tokens(seq);
        if (first_query > tokens) {
            throw invalid_argument("sliding_window: first query " + std::to_string(first_query) + " beyond sequence " +
                                   std::to_string(seq) + "'s " + std::to_string(tokens) + " tokens");
        }
        return first_query + 1 > window_ ? (first_query + 1 - window_) / cache_.geometry().block_tokens : 0;
    }
    /// The block standing in the tables for the blocks that left a window.
    [[nodiscard]] std::int32_t null_block() const noexcept { return null_block_; }
    [[nodiscard]] std::size_t window_tokens() const noexcept { return window_; }
    [[nodiscard]] Cache& cache() const noexcept { return cache_; }

private:
    static std::size_t checked_window(std::size_t window_tokens) {
        if (window_tokens == 0) {
            throw invalid_argument("sliding_window: window_tokens must not be zero");
        }
        return window_tokens;
    }

    Cache& cache_;
    std::size_t window_;
    std::int32_t null_block_;
};

}  // namespace vmmpp
