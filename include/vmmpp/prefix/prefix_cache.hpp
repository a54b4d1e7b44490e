// vmmpp/prefix/prefix_cache.hpp: prefix caching beside a kv_cache (vLLM's automatic prefix
// caching, SGLang's radix cache). Full blocks of requests are kept by content key
// (vmmpp/prefix/block_hash.hpp) after their sequences end; a new request whose prompt starts the
// same way gets those blocks instead of recomputing them. A block is live (a sequence holds it),
// cached (the prefix cache holds it, perhaps sequences too), or gone; cached blocks no sequence
// holds are soft memory, given up in the eviction policy's order (vmmpp/prefix/eviction.hpp);
// the pages they leave half empty are emptied by moving cached blocks down into free ids
// (compaction, vmmpp/prefix/compaction.hpp), so the memory still goes back in whole pages.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/layout.hpp"
#include "vmmpp/kv/relocate.hpp"
#include "vmmpp/prefix/block_hash.hpp"
#include "vmmpp/prefix/block_spill.hpp"
#include "vmmpp/prefix/compaction.hpp"
#include "vmmpp/prefix/eviction.hpp"
#include "vmmpp/prefix/page_groups.hpp"
#include "vmmpp/prefix/page_users.hpp"

namespace vmmpp {

/// Options of a prefix_cache.
struct prefix_cache_options {
    /// Bound on the bytes of cached blocks that no sequence holds (the memory the prefix cache
    /// alone keeps; a cached block a sequence holds costs nothing more). Past it, publish, attach,
    /// free and trim evict, oldest first. A kv_cache::free called directly lets the bytes pass
    /// the bound until the prefix cache's next call.
    std::size_t max_cached_bytes = std::numeric_limits<std::size_t>::max();
    /// Whether stored and removed events are queued for drain_events (cache-aware routers).
    bool record_events = false;
    /// At most this many blocks moved by one compaction (compact(), and the one trim and free
    /// run after letting blocks go): each move copies a block (its bytes through the copy
    /// engine on a GPU, memcpy on the host); 0 turns compaction off.
    std::size_t max_compaction_moves = 256;
};

/// What a prefix cache did since it was made, and what it holds now.
struct prefix_cache_stats {
    std::uint64_t hits = 0;       ///< blocks attach found cached
    std::uint64_t misses = 0;     ///< full blocks attach asked for and did not find (from the first miss on)
    std::uint64_t evictions = 0;  ///< blocks evicted
    std::uint64_t moves = 0;      ///< cached blocks compaction moved to a lower id
    std::size_t cached_blocks = 0, cached_bytes = 0;        ///< every block the prefix cache holds
    std::size_t evictable_blocks = 0, evictable_bytes = 0;  ///< those no sequence holds
    std::size_t committed_bytes = 0;     ///< the pool's committed bytes
    std::size_t packed_floor_bytes = 0;  ///< live and cached blocks' bytes, packed, in whole pages
    /// committed_bytes / packed_floor_bytes: 1 when every page holds blocks back to back
    /// (1 also when both are 0; infinity when memory is committed for no block).
    double idle_footprint_ratio = 1.0;
};

/// An entry of the event queue, as Dynamo's and llm-d's KV events: a block stored under `key`
/// (its chain's `parent`, root_block_key for a prompt's first block) or removed (evicted).
enum class prefix_event_kind : std::uint8_t { stored, removed };
struct prefix_event {
    prefix_event_kind kind;
    block_key key;
    block_key parent;  ///< stored events; root_block_key for a removed one
    std::int32_t block;
};

/// What an eviction (or a compaction) gave up.
struct eviction_result {
    std::vector<std::int32_t> blocks;  ///< the evicted block ids, in eviction order
    std::vector<block_key> keys;       ///< their keys, in the same order
    std::size_t freed_page_bytes = 0;  ///< bytes of pool pages no live or cached block touches any more
    std::size_t moved_blocks = 0;      ///< cached blocks compaction moved to lower ids (they stay cached)
};

/// A new sequence from attach: `cached_tokens` leading tokens already in its blocks.
struct attached_sequence {
    seq_id seq;
    std::size_t cached_tokens;
};

/// Prefix caching over `Cache`, a kv_cache of a layout whose blocks can be shared, ordered by
/// `Eviction`, an eviction_policy.
///
/// The prefix cache holds one reference (kv_cache::retain_block) on every block it caches, so
/// the kv_cache never frees it; the block is evictable once that is its only reference. The
/// engine keeps using the kv_cache as before: it appends, frees (kv_cache::free(seq, stream),
/// or free() here, which also keeps the bound), and calls publish after writing a sequence's
/// tokens, so full blocks are registered at once and requests running together share them.
/// Eviction drops the reference with kv_cache::release_block: a block's memory goes back only
/// after every stream that read it (the fences free left on it), never under queued work.
///
/// Compaction (compact(); also run by free, and by trim when it evicted) moves cached blocks no
/// sequence holds from the top of the id range down into the lowest free ids, when that empties
/// whole pages (vmmpp/prefix/compaction.hpp, at most max_compaction_moves a call): the bytes are
/// copied in the cache's stream order (vmmpp/kv/relocate.hpp) and the entry follows its block
/// (key_of, block_of, the policy's order); no event is queued (the key stays cached, and
/// routers know keys, not ids). Live blocks never move.
///
/// Thread safety: as kv_cache's (external synchronisation, the same as the kv_cache it uses).
/// The kv_cache must outlive the prefix cache; on destruction the prefix cache drops its
/// references (an asleep cache keeps them: their blocks stay live).
template <class Cache, class Eviction = lru_eviction>
class prefix_cache {
    using layout_type = typename Cache::layout_type;
    static_assert(!sequence_slot_layout<layout_type>,
                  "vmmpp::prefix_cache: the layout gives each sequence its own blocks (sequence_contiguous), nothing to share");
    static_assert(eviction_policy<Eviction>, "vmmpp::prefix_cache: Eviction does not model vmmpp::eviction_policy");

public:
    using cache_type = Cache;
    using eviction_type = Eviction;

    explicit prefix_cache(Cache& cache, prefix_cache_options options = {}, Eviction eviction = {})
        : cache_(cache), options_(options), policy_(std::move(eviction)),
          block_tokens_(cache.geometry().block_tokens), page_bytes_(cache.pool().page_bytes()),
          freed_pages_(cache.geometry(), page_bytes_) {
        layout_type::for_each_piece(cache.geometry(), 0, [&](std::size_t, std::size_t bytes) { block_bytes_ += bytes; });
    }
    prefix_cache(const prefix_cache&) = delete;
    prefix_cache& operator=(const prefix_cache&) = delete;
    ~prefix_cache() {
        for (const auto& [block, key] : by_block_) {
            try {
                cache_.release_block(block);
            } catch (...) {
                // asleep, or the device is gone: the block stays live (or its memory retired)
            }
        }
    }

    /// Registers the full blocks among the first tokens.size() tokens of `seq` (`tokens`: its
    /// token ids from the first, whose KV is written, at most tokens(seq)) under their keys
    /// (hash chain over the tokens and `extra`). A key already cached under another block, or
    /// a block already cached under another key, is left as it is: content is cached once.
    /// Call it as blocks fill (every step is fine: it hashes the tokens, and registers only what
    /// is new). Returns how many blocks it registered.
    /// Throws: invalid_argument (unknown sequence, more tokens than it has); std::bad_alloc, after
    /// which the blocks registered before it stay registered (each registration is whole).
    std::size_t publish(seq_id seq, std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) {
        const std::span<const std::int32_t> table = cache_.block_table(seq);
        if (tokens.size() > cache_.tokens(seq)) {
            throw invalid_argument("publish of " + std::to_string(tokens.size()) + " tokens of sequence " +
                                   std::to_string(seq) + ": it has " + std::to_string(cache_.tokens(seq)));
        }
        std::vector<block_key> keys;
        for_each_block_key(tokens, block_tokens_, extra, [&](std::size_t, const block_key& k) {
            keys.push_back(k);
            return true;
        });
        if (options_.record_events) {
            events_.reserve(events_.size() + keys.size());
        }
        std::size_t registered = 0;
        for (std::size_t i = 0; i < keys.size(); ++i) {
            const std::int32_t b = table[i];
            if (!by_key_.contains(keys[i]) && !by_block_.contains(b)) {
                add(keys[i], i == 0 ? root_block_key : keys[i - 1], b);
                ++registered;
            }
        }
        touch_chain(keys, table);
        trim();
        return registered;
    }

    /// How many leading tokens of `tokens` are cached (whole blocks, each chained over `extra`).
    /// An engine that needs the last prompt token's logits asks about all tokens but the last.
    [[nodiscard]] std::size_t lookup(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) const {
        return block_tokens_ *
               for_each_block_key(tokens, block_tokens_, extra,
                                  [&](std::size_t, const block_key& k) { return by_key_.contains(k); });
    }

    /// A new sequence holding the cached leading blocks of `tokens` (kv_cache::adopt), and how
    /// many tokens they hold; the engine appends the rest. The blocks found become the newest
    /// (tail first); hits and misses are counted in blocks.
    /// The blocks are safe to read on `stream` (default: the cache's own stream, which the engine's
    /// streams wait for as for append): a block compaction moved (a copy queued on whatever stream
    /// freed or trimmed) is read only after its copy.
    /// Throws what kv_cache::adopt throws (out_of_sequence_slots, std::bad_alloc), cuda_error
    /// queueing the wait: nothing changed (but waits queued, which only delay).
    attached_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra = {}) {
        return attach(tokens, extra, cache_.stream());
    }
    attached_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                             cudaStream_t stream) {
        std::vector<std::int32_t> blocks, moved;
        std::vector<block_key> keys;
        for_each_block_key(tokens, block_tokens_, extra, [&](std::size_t, const block_key& k) {
            const auto it = by_key_.find(k);
            if (it == by_key_.end()) {
                return false;
            }
            blocks.push_back(it->second.block);
            if (it->second.moved) {
                moved.push_back(it->second.block);
            }
            keys.push_back(k);
            return true;
        });
        cache_.order_reads_after_fences(moved, stream);
        const seq_id seq = cache_.adopt(blocks, blocks.size() * block_tokens_);  // strong
        hits_ += blocks.size();
        misses_ += tokens.size() / block_tokens_ - blocks.size();
        touch_chain(keys, blocks);
        return {seq, blocks.size() * block_tokens_};
    }

    /// kv_cache::append, with cached blocks as soft memory: when the append is refused
    /// (out_of_blocks, over_quota, out_of_memory), evicts cached blocks no sequence holds (in the
    /// policy's order; for memory, then compacts so whole pages go back) and tries again, until
    /// it succeeds or nothing is left to evict (then the last refusal is thrown, with the cache
    /// as the evictions left it). Live blocks are never touched.
    /// On a device backing, evicted memory comes back only after its readers' streams: an append
    /// right behind a free may still be refused, after evicting more.
    token_range append(seq_id seq, std::size_t n_tokens) { return append(seq, n_tokens, nullptr, false); }
    token_range append(seq_id seq, std::size_t n_tokens, cudaStream_t stream) { return append(seq, n_tokens, stream, true); }

    /// kv_cache::free(seq, stream), then the bound (max_cached_bytes) is kept and the holes the
    /// sequence left are compacted (trim's, or compact(stream) when trim evicted nothing);
    /// returns what those did.
    eviction_result free(seq_id seq) { return free(seq, cache_.stream()); }
    eviction_result free(seq_id seq, cudaStream_t stream) {
        cache_.free(seq, stream);
        eviction_result r = trim(stream);
        if (r.blocks.empty()) {
            compact_unless_refused(r, stream);
        }
        return r;
    }

    /// Evicts `n_blocks` evictable blocks (or all there are), in the policy's order (oldest
    /// first for lru_eviction), whatever pages they share. Costs the policy's order up to the
    /// n-th evictable block, and per evicted block its pages and the ids on them up to a live
    /// one (detail::eviction_pages), not a pass over every evictable block. Throws: cuda_error
    /// giving memory back, with the blocks evicted so far gone from the cache.
    eviction_result evict(std::size_t n_blocks) {
        const std::vector<std::int32_t> victims = evictable_in_order(n_blocks);
        offer_to_spill(victims);
        eviction_result result = reserved_result(victims.size());
        for (std::int32_t b : victims) {
            evict_one(b, result);
            result.freed_page_bytes += freed_pages_.freed_by(cache_, b);
        }
        return result;
    }

    /// Evicts whole page groups (the evictable blocks that alone hold some pages), the group
    /// whose newest block is oldest first, until at least `bytes` of pool pages hold no live or
    /// cached block, or no group is left (blocks that share every page with a live block free
    /// no page: they stay). Memory asked for now comes back at once, without copies (compaction
    /// would move blocks first). Throws as evict.
    eviction_result evict_bytes(std::size_t bytes) {
        detail::page_groups<Cache> pages(cache_, page_bytes_, evictable_in_order());  // the full view: groups
        eviction_result result = reserved_result(pages.order().size());
        for (const auto& g : pages.groups()) {
            if (result.freed_page_bytes >= bytes) {
                break;
            }
            offer_to_spill(g.members);
            for (std::int32_t b : g.members) {
                if (!pages.gone(b)) {
                    evict_one(b, result);
                    result.freed_page_bytes += pages.evicted(b);
                }
            }
        }
        return result;
    }

    /// Offers every block evicted from now on to `tier` before letting it go (a host tier keeps
    /// a copy: vmmpp/prefix/block_spill.hpp); nullptr: evicted blocks are dropped (the default).
    /// The tier must outlive its use here.
    void spill_to(block_spill* tier) noexcept { spill_ = tier; }

    /// Evicts every evictable block.
    eviction_result clear() { return evict(std::numeric_limits<std::size_t>::max()); }

    /// Keeps the bound: evicts, in the policy's order, while evictable bytes exceed
    /// max_cached_bytes; if it evicted, then compacts on `stream` (by default the cache's own),
    /// stopping quietly where a move is refused memory (over_quota, out_of_memory,
    /// retired_memory: compaction only saves memory, it must not fail a free or a publish).
    /// The result counts both. Throws as evict, and cuda_error from compaction.
    eviction_result trim() { return trim(cache_.stream()); }
    eviction_result trim(cudaStream_t stream) {
        eviction_result all;
        if (by_block_.size() * block_bytes_ <= options_.max_cached_bytes) {
            return all;  // even every cached block evictable keeps the bound: no pass over them
        }
        for (std::size_t over = evictable_bytes(); over > options_.max_cached_bytes;
             over = evictable_bytes()) {
            eviction_result r = evict((over - options_.max_cached_bytes + block_bytes_ - 1) / block_bytes_);
            if (r.blocks.empty()) {
                break;
            }
            all.blocks.insert(all.blocks.end(), r.blocks.begin(), r.blocks.end());
            all.keys.insert(all.keys.end(), r.keys.begin(), r.keys.end());
            all.freed_page_bytes += r.freed_page_bytes;
        }
        if (!all.blocks.empty()) {
            compact_unless_refused(all, stream);
        }
        return all;
    }

    /// Moves cached blocks no sequence holds, the highest id first, into the lowest free ids
    /// when that empties whole pages (at most max_compaction_moves; none when no page would
    /// empty; none in a pool whose span is committed for good, as static_config's), copying on
    /// `stream` (by default the cache's own) after the work that last used
    /// either id (vmmpp/kv/relocate.hpp). Returns the blocks moved (moved_blocks) and the bytes of
    /// the pages they emptied, net of pages their new ids reached (freed_page_bytes); blocks and
    /// keys stay empty. Costs a scan of the ids up to the lowest free one and of the cached ids
    /// above it (not of every id: bench/results/prefix-cost-host-2026-12-07), and where a move is
    /// possible a pass over the live blocks' pages and one block copy a move.
    /// Throws: what relocate_block throws (over_quota, out_of_memory where a destination's page
    /// must be committed, cuda_error): the moves before it stand, the failed one changed nothing
    /// but where its release failed after taking effect.
    eviction_result compact() { return compact(cache_.stream()); }
    eviction_result compact(cudaStream_t stream) {
        eviction_result r;
        compact_into(r, stream);
        return r;
    }
    // --- questions without side effects ---

    /// The key block `block` is cached under, if it is cached.
    [[nodiscard]] std::optional<block_key> key_of(std::int32_t block) const {
        const auto it = by_block_.find(block);
        return it == by_block_.end() ? std::nullopt : std::optional<block_key>(it->second);
    }
    /// The block cached under `key`, if any.
    [[nodiscard]] std::optional<std::int32_t> block_of(const block_key& key) const {
        const auto it = by_key_.find(key);
        return it == by_key_.end() ? std::nullopt : std::optional<std::int32_t>(it->second.block);
    }
    /// Calls f(key, block) for every cached block.
    template <class F>
    void for_each_cached(F&& f) const {
        for (const auto& [key, e] : by_key_) {
            f(key, e.block);
        }
    }
    /// Calls f(block, key) for the evictable blocks, next to be evicted first, while f returns
    /// true (a lower tier copies ahead the blocks it would be handed first: host_tier::store_ahead).
    template <class F>
    void for_each_evictable(F&& f) const {
        policy_.for_each_oldest([&](std::int32_t b) { return cache_.block_refs(b) != 1 || f(b, by_block_.at(b)); });
    }
    [[nodiscard]] std::size_t cached_blocks() const noexcept { return by_key_.size(); }
    /// Whether `block` is cached and no sequence holds it.
    [[nodiscard]] bool evictable(std::int32_t block) const {
        return by_block_.contains(block) && cache_.block_refs(block) == 1;
    }
    [[nodiscard]] std::size_t evictable_blocks() const {
        std::size_t n = 0;
        for (const auto& [block, key] : by_block_) {
            n += cache_.block_refs(block) == 1 ? 1 : 0;
        }
        return n;
    }
    [[nodiscard]] std::size_t evictable_bytes() const { return evictable_blocks() * block_bytes_; }
    /// Bytes of one block (all its pieces).
    [[nodiscard]] std::size_t block_bytes() const noexcept { return block_bytes_; }
    [[nodiscard]] const prefix_cache_options& options() const noexcept { return options_; }
    [[nodiscard]] Cache& cache() const noexcept { return cache_; }

    [[nodiscard]] prefix_cache_stats stats() const {
        prefix_cache_stats s;
        s.hits = hits_;
        s.misses = misses_;
        s.evictions = evictions_;
        s.moves = moves_;
        s.cached_blocks = by_key_.size();
        s.cached_bytes = s.cached_blocks * block_bytes_;
        s.evictable_blocks = evictable_blocks();
        s.evictable_bytes = s.evictable_blocks * block_bytes_;
        s.committed_bytes = cache_.pool().committed_bytes();
        const std::size_t packed = cache_.used_blocks() * block_bytes_;
        s.packed_floor_bytes = (packed + page_bytes_ - 1) / page_bytes_ * page_bytes_;
        if (s.packed_floor_bytes != 0) {
            s.idle_footprint_ratio = static_cast<double>(s.committed_bytes) / static_cast<double>(s.packed_floor_bytes);
        } else if (s.committed_bytes != 0) {
            s.idle_footprint_ratio = std::numeric_limits<double>::infinity();
        }
        return s;
    }

    /// The events queued since the last drain (record_events), oldest first; the queue empties.
    [[nodiscard]] std::vector<prefix_event> drain_events() noexcept { return std::exchange(events_, {}); }

private:
    struct entry {
        std::int32_t block;
        block_key parent;
        bool moved = false;  // compaction copied it here: readers on other streams wait for the copy
    };
    /// compact(stream), adding to `r` as moves are made (so a throw leaves what was done in it).
    void compact_into(eviction_result& r, cudaStream_t stream) {
        if constexpr (!Cache::pool_type::growth_type::is_elastic) {
            return;  // the span is committed for good: a move would copy and free nothing
        } else {
            compact_elastic_into(r, stream);
        }
    }
    void compact_elastic_into(eviction_result& r, cudaStream_t stream) {
        if (options_.max_compaction_moves == 0 || cache_.asleep()) {
            return;
        }
        const detail::compaction_plan plan =
            detail::plan_compaction(cache_, page_bytes_, options_.max_compaction_moves, ids_, page_users_,
                                    [&](std::int32_t b) { return cache_.block_refs(b) == 1; });
        for (const detail::block_move& m : plan.moves) {
            std::int32_t at = m.from;
            const std::int32_t to = relocate_block(cache_, m.from, stream, [&](std::int32_t now) noexcept {
                rekey(at, now);
                at = now;
            });
            if (to != m.to) {
                return;  // ids were not as planned (never expected): stop, the moves made stand
            }
            ++r.moved_blocks;
            ++moves_;
        }
        r.freed_page_bytes += plan.freed_page_bytes;
    }
    /// compact_into, where a refusal of memory only ends the compaction (the moves made stand;
    /// the pages a cut plan frees are not counted in freed_page_bytes).
    void compact_unless_refused(eviction_result& r, cudaStream_t stream) {
        try {
            compact_into(r, stream);
        } catch (const over_quota&) {
        } catch (const out_of_memory&) {
        } catch (const retired_memory&) {
        }
    }

    /// An empty result with room for `n` evictions, and room for their events.
    [[nodiscard]] eviction_result reserved_result(std::size_t n) {
        if (options_.record_events) {
            events_.reserve(events_.size() + n);
        }
        eviction_result result;
        result.blocks.reserve(n);
        result.keys.reserve(n);
        return result;
    }
    /// Offers the evictable blocks among `blocks` (about to be evicted) to the spill tier, if any.
    void offer_to_spill(std::span<const std::int32_t> blocks) noexcept {
        if (spill_ == nullptr || blocks.empty()) {
            return;
        }
        try {
            std::vector<std::int32_t> ids;
            std::vector<block_key> keys;
            for (std::int32_t b : blocks) {
                if (const auto it = by_block_.find(b); it != by_block_.end() && cache_.block_refs(b) == 1) {
                    ids.push_back(b);
                    keys.push_back(it->second);
                }
            }
            spill_->spill(ids, keys);
        } catch (...) {
            // std::bad_alloc: the blocks are dropped, as with no tier
        }
    }
    /// Evicts cached block `b` (evictable) into `result` (blocks, keys; not the pages).
    void evict_one(std::int32_t b, eviction_result& result) {
        const block_key key = by_block_.at(b);
        remove(b);
        result.blocks.push_back(b);  // room reserved
        result.keys.push_back(key);
    }

    /// The first `most` evictable blocks (all by default), first to evict first: the policy's
    /// order is walked only that far.
    [[nodiscard]] std::vector<std::int32_t> evictable_in_order(
        std::size_t most = std::numeric_limits<std::size_t>::max()) const {
        std::vector<std::int32_t> order;
        policy_.for_each_oldest([&](std::int32_t b) {
            if (order.size() < most && cache_.block_refs(b) == 1) {
                order.push_back(b);
            }
            return order.size() < most;
        });
        return order;
    }

    /// Cached block `from` now lives at `to` (compaction moved it): its entry follows. No
    /// allocation (map nodes are moved, not made), so it cannot fail.
    void rekey(std::int32_t from, std::int32_t to) noexcept {
        auto node = by_block_.extract(from);
        entry& e = by_key_.find(node.mapped())->second;
        e.block = to;
        e.moved = true;
        node.key() = to;
        by_block_.insert(std::move(node));
        auto id = ids_.extract(from);
        id.value() = to;
        ids_.insert(std::move(id));
        policy_.replace(from, to);
    }

    /// Registers block `b` (live, held by a sequence) under `key`: each step undone if a later
    /// one throws, the reference taken last (it cannot fail for a live block of a paged layout).
    void add(const block_key& key, const block_key& parent, std::int32_t b) {
        by_key_.emplace(key, entry{b, parent});
        try {
            by_block_.emplace(b, key);
            try {
                ids_.insert(b);
                try {
                    policy_.insert(b);
                } catch (...) {
                    ids_.erase(b);
                    throw;
                }
            } catch (...) {
                by_block_.erase(b);
                throw;
            }
        } catch (...) {
            by_key_.erase(key);
            throw;
        }
        cache_.retain_block(b);
        if (options_.record_events) {
            events_.push_back({prefix_event_kind::stored, key, parent, b});  // room reserved by publish
        }
    }

    /// Drops block `b` from the cache and its reference. If release_block throws before taking
    /// effect, the block stays cached; after (memory back failed), it is gone and the error passes.
    void remove(std::int32_t b) {
        const block_key key = by_block_.at(b);
        try {
            cache_.release_block(b);
        } catch (...) {
            if (cache_.block_refs(b) != 0) {
                throw;  // nothing changed
            }
            forget(key, b);
            throw;
        }
        forget(key, b);
    }
    void forget(const block_key& key, std::int32_t b) noexcept {
        by_key_.erase(key);
        by_block_.erase(b);
        ids_.erase(b);
        policy_.erase(b);
        ++evictions_;
        if (options_.record_events && events_.size() < events_.capacity()) {  // room reserved by reserved_result
            events_.push_back({prefix_event_kind::removed, key, root_block_key, b});
        }
    }

    /// Marks the cached blocks of a chain used now, the last first, so a prompt's head is the
    /// newest and its tail goes first. Only blocks cached under their own key are touched.
    void touch_chain(std::span<const block_key> keys, std::span<const std::int32_t> blocks) noexcept {
        for (std::size_t i = std::min(keys.size(), blocks.size()); i-- > 0;) {
            if (const auto it = by_key_.find(keys[i]); it != by_key_.end() && it->second.block == blocks[i]) {
                policy_.touch(blocks[i]);
            }
        }
    }

    token_range append(seq_id seq, std::size_t n_tokens, cudaStream_t stream, bool on_stream) {
        for (;;) {
            try {
                return on_stream ? cache_.append(seq, n_tokens, stream) : cache_.append(seq, n_tokens);
            } catch (const out_of_blocks& e) {
                if (evict(e.needed() > e.free() ? e.needed() - e.free() : 1).blocks.empty()) {
                    throw;
                }
            } catch (const over_quota& e) {
                const std::size_t room = e.limit() > e.in_use() ? e.limit() - e.in_use() : 0;
                if (evict_for_memory(e.requested() > room ? e.requested() - room : page_bytes_, on_stream ? stream : cache_.stream())) {
                    continue;
                }
                throw;
            } catch (const out_of_memory& e) {
                if (evict_for_memory(e.requested(), on_stream ? stream : cache_.stream())) {
                    continue;
                }
                throw;
            }
        }
    }
    /// After a refusal for memory (`bytes` short): as many blocks as `bytes` holds (at least
    /// one), in the policy's order, then compaction on `stream`, so pages empty without choosing
    /// victims by page; the append's new blocks also reuse the freed ids' committed memory (ids
    /// go lowest free first). On bench_prefix_cache's quota trace this lost 6 points of hit rate
    /// fewer than evicting whole page groups (bench/results/prefix-compact-host-2026-12-07).
    /// False when nothing was evictable.
    bool evict_for_memory(std::size_t bytes, cudaStream_t stream) {
        eviction_result r = evict(std::max<std::size_t>(1, (bytes + block_bytes_ - 1) / block_bytes_));
        if (r.blocks.empty()) {
            return false;
        }
        compact_unless_refused(r, stream);
        return true;
    }

    Cache& cache_;
    prefix_cache_options options_;
    Eviction policy_;
    std::size_t block_tokens_;
    std::size_t page_bytes_;
    std::size_t block_bytes_ = 0;
    std::unordered_map<block_key, entry, block_key_hash> by_key_;
    std::unordered_map<std::int32_t, block_key> by_block_;
    std::set<std::int32_t> ids_;                // the cached blocks, by id: compaction walks them from the top
    std::vector<std::uint32_t> page_users_;     // compaction's scratch: live blocks per page, all zero between calls
    detail::eviction_pages<Cache> freed_pages_;  // the pages each eviction frees
    block_spill* spill_ = nullptr;               // where evicted blocks go (a lower tier), if anywhere
    std::vector<prefix_event> events_;
    std::uint64_t hits_ = 0, misses_ = 0, evictions_ = 0, moves_ = 0;
};

} // namespace vmmpp
