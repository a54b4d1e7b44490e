// vmmpp/kv/cache.hpp: kv_cache<Config, Layout>, the paged KV cache a scheduler and its
// paged-attention kernels talk to. Sequences own lists of fixed-size blocks; blocks are shared
// between forks by reference count and copied on write; the memory under live blocks is held in
// an elastic_pool, so physical memory follows the live tokens.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/kv/block_allocator.hpp"
#include "vmmpp/kv/block_ids.hpp"
#include "vmmpp/kv/cache_options.hpp"
#include "vmmpp/kv/detail/block_memory.hpp"
#include "vmmpp/kv/detail/block_tables.hpp"
#include "vmmpp/kv/detail/device_copy.hpp"
#include "vmmpp/kv/geometry.hpp"
#include "vmmpp/kv/held_blocks.hpp"
#include "vmmpp/kv/layout.hpp"
#include "vmmpp/kv/leading_blocks.hpp"
#include "vmmpp/kv/sequence_slots.hpp"
#include "vmmpp/kv/sleep.hpp"
#include "vmmpp/kv/tensor.hpp"
#include "vmmpp/pool.hpp"

namespace vmmpp {

/// A paged KV cache over an elastic_pool<Config>, laid out by `Layout`, a kv_layout
/// (vmmpp/kv/layout.hpp: layer_major, layer_major_hnd, block_major, block_major_hnd, packed_kv,
/// mla, sequence_contiguous: block ids by sequence slot, see sequence_tensor).
///
/// The default layout is block_major: all layers of a block lie together, so a new block is one
/// range of the pool and its growth one commit. Under layer_major a block is one piece per layer
/// and part (64 for 32 layers of K and V), each in its own region, and a block that reaches fresh
/// pages commits one handle in every region (per-handle costs: docs/ARCHITECTURE.md, "Driver
/// costs"). Kernels see per-layer [blocks, tokens, heads, dim] tensors either way (tensor()).
///
/// The cache keeps sequences; its parts do the rest: the layout's block-id policy
/// (block_ids_of<Layout>, a kv_block_ids) hands out ids and keeps reference counts,
/// detail::block_memory holds their memory in the pool in stream order, detail::cache_sleep
/// (vmmpp/kv/sleep.hpp) sleeps and wakes, detail::held_blocks (vmmpp/kv/held_blocks.hpp) serves
/// holders other than sequences (adopt, retain/take/release_block: a prefix cache), and
/// detail::device_copy makes every copy.
///
/// Thread safety: like a standard container: concurrent const calls are safe, anything else
/// needs external synchronisation. Several caches on one shared budget may be used from
/// different threads (their pools and the budget are thread safe).
///
/// Every operation either succeeds or throws and leaves the cache as it was (strong guarantee),
/// except that spare pages the pool gave back to make room stay given back; the other exception
/// is a CUDA failure while giving memory back in `free`/`truncate`, after which the sequence
/// change has still taken effect (the pool retires that memory: see elastic_pool).
///
/// Stream order (docs/ARCHITECTURE.md, "Stream order"): memory is never given back, and a block
/// never written again, under GPU work that may still read it. The cache's own copies run on
/// `kv_cache_options::stream`. `free(seq, stream)` and `truncate(seq, n, stream)` record an event
/// after the work queued on `stream` (by default `kv_cache_options::stream`) on every block they
/// let go of, shared ones included; its memory goes back once every such event completed, on a
/// later call or, for an idle pool, without one. A freed block id may be handed out again at
/// once: `append(seq, n, stream)` makes `stream` wait (cuStreamWaitEvent) for the reads queued
/// before the block's free, so work queued on `stream` after the append may write its new tokens.
/// copy_blocks (vmmpp/kv/transfer.hpp) follows the same order (order_outside_write, fence_blocks).
/// The caller's thread never waits.
template <class Config, class Layout = block_major>
class kv_cache {
    static_assert(kv_layout<Layout>, "vmmpp::kv_cache: Layout does not model vmmpp::kv_layout");
    static_assert(kv_block_ids<block_ids_of<Layout>>,
                  "vmmpp::kv_cache: Layout::block_ids does not model vmmpp::kv_block_ids");
    friend class detail::cache_sleep<kv_cache>;
    friend struct detail::held_blocks<kv_cache>;
    friend struct detail::leading_blocks<kv_cache>;
    static constexpr bool slotted = sequence_slot_layout<Layout>;  // the members below that say so

public:
    using pool_type = elastic_pool<Config>;
    using backing_type = typename Config::backing_type;
    using layout_type = Layout;

    /// Builds the pool for `geometry` (validated first, by kv_geometry::validate and the
    /// layout's validate: invalid_argument naming what does not fit) with the given policies' arguments.
    explicit kv_cache(const kv_geometry& geometry, typename backing_type::options backing_options = {},
                      typename Config::growth_type growth = {}, typename Config::quota_type quota = {},
                      kv_cache_options options = {})
        : geometry_(detail::validated<Layout>(geometry)),
          options_(options),
          pool_(detail::span_bytes<Layout>(geometry_, options.span_alignment), std::move(backing_options),
                std::move(growth), std::move(quota)),
          blocks_(geometry_),
          copy_(pool_.device()),
          memory_(pool_, geometry_, options_.stream) {
        // Where the first blocks go: a background mapper starts its spares there (else a no-op).
        Layout::for_each_piece(geometry_, 0, [&](std::size_t off, std::size_t bytes) { pool_.will_need(off, bytes); });
    }

    kv_cache(const kv_cache&) = delete;
    kv_cache& operator=(const kv_cache&) = delete;

    /// A new, empty sequence.
    [[nodiscard]] seq_id add_sequence() {
        const seq_id id = next_id_;
        const std::uint32_t slot = blocks_.take_slot();  // may throw (out_of_sequence_slots): nothing changed yet
        try {
            sequences_.emplace(id, sequence{{}, 0, slot});
        } catch (...) {
            blocks_.give_slot(slot);
            throw;
        }
        ++next_id_;
        return id;
    }

    /// Appends `n_tokens` tokens to `seq`: takes blocks as needed (ids from the layout's block-id
    /// policy: lowest free first, or the sequence's slot) and holds their memory in the pool. If
    /// the last block is shared (after a fork) and partly filled, it is first copied to a block
    /// of the sequence's own (copy-on-write). Returns the new tokens' range; their slots come
    /// from slot_mapping.
    /// Throws: invalid_argument (unknown sequence), out_of_blocks, over_quota, out_of_memory,
    /// retired_memory, cuda_error. Guarantee: strong (see the class comment).
    token_range append(seq_id seq, std::size_t n_tokens) { return append(seq, n_tokens, options_.stream); }

    /// As append(seq, n_tokens), for new tokens written by work queued on `stream` after the
    /// call: a block handed out again while reads queued before its free may still run makes
    /// `stream` wait for them first (see the class comment), and a copy-on-write of a shared
    /// partial block is queued on `stream`, after the work there that wrote its tokens.
    token_range append(seq_id seq, std::size_t n_tokens, cudaStream_t stream) {
        sleep_.refuse("append");  // no memory to append into
        sequence& s = find(seq);
        const token_range added{s.tokens, n_tokens};
        if (n_tokens == 0) {
            return added;
        }
        const plan p = plan_append(s, n_tokens);
        blocks_.check_room(seq, s.tokens, n_tokens, Layout::name);
        if (p.new_blocks > blocks_.free_blocks()) {
            throw out_of_blocks(p.new_blocks, blocks_.free_blocks(), blocks_.max_blocks());
        }
        s.blocks.reserve(p.total_blocks);  // may throw: nothing changed yet
        std::vector<std::int32_t> fresh;
        fresh.reserve(p.new_blocks);
        bool held = false;  // the fresh blocks' pieces (all of them, or none)
        try {
            while (fresh.size() < p.new_blocks) {
                fresh.push_back(blocks_.allocate(s.slot, s.blocks.size() + fresh.size()));
            }
            // The quota is asked once for the whole append, before anything is committed.
            const auto prepaid = prepay_append(seq, n_tokens, fresh);
            memory_.commit_ahead(fresh);
            memory_.hold(fresh);
            held = true;
            memory_.order_writes_after_reads(fresh, stream);
            if (p.copy_on_write) {
                copy_block(s.blocks.back(), fresh.front(), stream);
            }
        } catch (...) {
            // Rows of a failed copy may already be queued into the fresh blocks.
            const pool_fence after = memory_.failed_append_fence(p.copy_on_write, stream);
            for (std::int32_t b : fresh) {
                blocks_.release(b);
            }
            if (held) {
                memory_.unhold_noexcept(fresh, after);
            }
            throw;
        }
        // Commit point: nothing below throws.
        auto next = fresh.begin();
        if (p.copy_on_write) {
            blocks_.release(s.blocks.back());  // still referenced by the other sequence(s)
            s.blocks.back() = *next++;
            ++cow_copies_;
        }
        s.blocks.insert(s.blocks.end(), next, fresh.end());
        s.tokens += n_tokens;
        return added;
    }

    /// A new sequence sharing every block of `seq` (reference counted, no copy).
    /// Throws: invalid_argument (unknown sequence). Guarantee: strong.
    [[nodiscard]] seq_id fork(seq_id seq) {
        const sequence& parent = find(seq);
        blocks_.check_fork(seq, Layout::name);
        sequence child{parent.blocks, parent.tokens};  // may throw: nothing changed yet
        const seq_id id = next_id_;
        sequences_.emplace(id, std::move(child));
        ++next_id_;
        for (std::int32_t b : sequences_.at(id).blocks) {
            blocks_.retain(b);
        }
        return id;
    }

    /// A new sequence of `n_tokens` tokens whose blocks are `blocks`, live blocks of this cache
    /// (e.g. a prefix cache's blocks, vmmpp/prefix/prefix_cache.hpp): each gets one more
    /// reference and is shared copy-on-write, as after fork. `n_tokens` must need exactly
    /// blocks.size() blocks; an empty span gives an empty sequence, as add_sequence.
    /// Throws: invalid_argument (the layout cannot share blocks, as fork; a block out of range,
    /// free or given twice; a token count that does not fill the blocks; nothing changed),
    /// out_of_sequence_slots, std::bad_alloc. Guarantee: strong.
    [[nodiscard]] seq_id adopt(std::span<const std::int32_t> blocks, std::size_t n_tokens) {
        return detail::held_blocks<kv_cache>::adopt(*this, blocks, n_tokens);
    }

    /// One more reference to live block `block`, held by the caller rather than by a sequence
    /// (a prefix cache keeps its blocks so): the block stays live until release_block.
    /// Throws: invalid_argument (a block out of range or free; nothing changed). Strong.
    void retain_block(std::int32_t block) { detail::held_blocks<kv_cache>::retain(*this, block); }

    /// The lowest free block id, live with one reference the caller holds (release_block drops
    /// it), its memory held; work queued on `stream` after the call may write it (the reads
    /// queued before its last free come first, as append's). For moving a block's bytes to a
    /// lower id (vmmpp/kv/relocate.hpp).
    /// Throws: invalid_argument (a layout that cannot share blocks), cache_asleep, out_of_blocks,
    /// over_quota, out_of_memory, retired_memory, cuda_error. Guarantee: strong.
    [[nodiscard]] std::int32_t take_block(cudaStream_t stream) {
        return detail::held_blocks<kv_cache>::take(*this, stream);
    }

    /// Drops one reference taken by retain_block, as free() drops a sequence's: if it was the
    /// last, the block's memory goes back after the work queued on `stream` (by default
    /// kv_cache_options::stream) and after every stream that read the block before (the fences
    /// free() and truncate() left on it), never before.
    /// Throws: invalid_argument (a block out of range or free, or a layout that cannot share
    /// blocks; nothing changed), cache_asleep; cuda_error recording the fence (nothing changed)
    /// or giving memory back (the release has taken effect).
    void release_block(std::int32_t block) { release_block(block, options_.stream); }
    void release_block(std::int32_t block, cudaStream_t stream) {
        detail::held_blocks<kv_cache>::release(*this, block, stream);
    }

    /// Lets go of the first `count` blocks of live sequence `seq` while it goes on (a sliding
    /// window's blocks that left the window: vmmpp/groups/sliding_window.hpp): each position
    /// holds `placeholder` instead, a live block the caller holds (take_block), with one more
    /// reference per position, so block tables keep their length and fork, truncate and free
    /// work as before. Positions already holding it are skipped. A released block's memory goes
    /// back after the work queued on `stream` and every earlier reader, as free()'s. Returns the
    /// blocks released.
    /// Throws: invalid_argument (unknown sequence, `count` beyond its blocks or covering its
    /// partly filled last block, a placeholder that is free, a layout that cannot share blocks;
    /// nothing changed), cache_asleep; cuda_error recording the fence (nothing changed) or giving
    /// memory back (the release has taken effect).
    std::size_t release_leading_blocks(seq_id seq, std::size_t count, std::int32_t placeholder, cudaStream_t stream) {
        return detail::leading_blocks<kv_cache>::release(*this, seq, count, placeholder, stream);
    }

    /// Keeps the first `n_tokens` tokens of `seq` (e.g. rejected speculative tokens) and lets
    /// go of the blocks no longer needed, once the cache's own queued copies are done.
    void truncate(seq_id seq, std::size_t n_tokens) { truncate(seq, n_tokens, options_.stream); }

    /// As truncate(seq, n_tokens), for blocks that work queued on `stream` may still read: their
    /// memory goes back only once that work (and the cache's own copies) completed.
    /// Throws: invalid_argument (unknown sequence, more tokens than it has; nothing changed);
    /// cuda_error recording the fence (nothing changed) or giving memory back (the truncate has
    /// taken effect).
    void truncate(seq_id seq, std::size_t n_tokens, cudaStream_t stream) {
        sleep_.refuse("truncate");  // the blocks hold no memory
        sequence& s = find(seq);
        if (n_tokens > s.tokens) {
            throw invalid_argument("truncate of sequence " + std::to_string(seq) + " to " + std::to_string(n_tokens) +
                                   " tokens: it has only " + std::to_string(s.tokens));
        }
        const std::size_t keep = geometry_.blocks_for(n_tokens);
        const std::span<const std::int32_t> tail(s.blocks.begin() + static_cast<std::ptrdiff_t>(keep), s.blocks.end());
        std::vector<std::int32_t> dropped(tail.begin(), tail.end());  // may throw: nothing changed yet
        memory_.prepare_drop(dropped, stream, blocks_);                  // likewise
        s.blocks.resize(keep);
        s.tokens = n_tokens;
        memory_.drop(dropped, blocks_);
    }

    /// Frees `seq`: blocks whose last reference it held are freed, and pages that hold no live
    /// block go back as the growth policy says, once the cache's own queued copies are done. An
    /// unknown or already freed id is an error.
    void free(seq_id seq) { free(seq, options_.stream); }

    /// As free(seq), for blocks that work queued on `stream` may still read (the engine's last
    /// step): their memory goes back only once that work (and the cache's own copies) completed.
    /// The call does not wait for the GPU.
    /// Throws: invalid_argument (unknown or freed sequence; nothing changed); cuda_error recording
    /// the fence (nothing changed) or giving memory back (the free has taken effect).
    void free(seq_id seq, cudaStream_t stream) {
        sleep_.refuse("free");  // the blocks hold no memory
        auto it = sequences_.find(seq);
        if (it == sequences_.end()) {
            throw unknown_sequence(seq);
        }
        memory_.prepare_drop(it->second.blocks, stream, blocks_);  // may throw: nothing changed yet
        std::vector<std::int32_t> dropped = std::move(it->second.blocks);
        const std::uint32_t slot = it->second.slot;
        sequences_.erase(it);
        struct slot_back {  // the slot is free once its blocks are, even if giving memory back throws
            kv_cache& c;
            std::uint32_t slot;
            ~slot_back() { c.blocks_.give_slot(slot); }
        } give_back{*this, slot};
        memory_.drop(dropped, blocks_);
    }

    /// Gives back memory whose release waited for GPU work that has completed since (the pool's
    /// collect). Never waits; returns the bytes given back.
    std::size_t collect() { return pool_.collect(); }

    // --- questions without side effects ---

    /// Whether append(seq, n_tokens) would find enough free blocks (memory and quota are only
    /// known by trying).
    [[nodiscard]] bool can_append(seq_id seq, std::size_t n_tokens) const {
        const sequence& s = find(seq);
        const std::size_t max_tokens = std::size_t{geometry_.max_blocks} * geometry_.block_tokens;
        if (n_tokens > max_tokens - s.tokens || !blocks_.fits(s.tokens + n_tokens)) {
            return false;
        }
        return n_tokens == 0 || plan_append(s, n_tokens).new_blocks <= blocks_.free_blocks();
    }
    [[nodiscard]] std::size_t free_blocks() const noexcept { return blocks_.free_blocks(); }
    [[nodiscard]] std::size_t used_blocks() const noexcept { return blocks_.used_blocks(); }
    [[nodiscard]] std::size_t blocks_needed(std::size_t n_tokens) const noexcept {
        return geometry_.blocks_for(n_tokens);
    }
    [[nodiscard]] bool contains(seq_id seq) const noexcept { return sequences_.contains(seq); }
    [[nodiscard]] std::size_t sequence_count() const noexcept { return sequences_.size(); }
    [[nodiscard]] std::size_t tokens(seq_id seq) const { return find(seq).tokens; }
    /// References to a block (0 when free).
    [[nodiscard]] std::uint32_t block_refs(std::int32_t block) const { return blocks_.refs(block); }
    /// Copy-on-write copies made so far.
    [[nodiscard]] std::uint64_t cow_copies() const noexcept { return cow_copies_; }

    // --- what kernels read ---

    /// The block table of `seq`: its block ids in token order.
    [[nodiscard]] std::span<const std::int32_t> block_table(seq_id seq) const { return find(seq).blocks; }

    /// Slots of tokens [first, first + out.size()) of `seq`, as vLLM's slot_mapping:
    /// block * block_tokens + offset in block, int64.
    void slot_mapping(seq_id seq, std::size_t first, std::span<std::int64_t> out) const {
        const sequence& s = find(seq);
        detail::slot_mapping(seq, s.blocks, s.tokens, geometry_.block_tokens, first, out);
    }

    /// Packs the block tables of `seqs` into `out` as a [seqs.size(), max_blocks_per_seq] int32
    /// row-major matrix, rows padded with `pad`.
    void pack_block_tables(std::span<const seq_id> seqs, std::size_t max_blocks_per_seq, std::span<std::int32_t> out,
                           std::int32_t pad = 0) const {
        detail::pack_tables(seqs, max_blocks_per_seq, geometry_.max_blocks, out, pad,
                            [&](seq_id id) { return std::span<const std::int32_t>(find(id).blocks); });
    }

    /// Packs the block tables (as pack_block_tables) and copies them to `device_out` (device
    /// memory of [seqs.size() * max_blocks_per_seq] int32) on `stream`. The host staging buffer
    /// may be reused as soon as this returns.
    void upload_block_tables(std::span<const seq_id> seqs, std::size_t max_blocks_per_seq, std::int32_t* device_out,
                             cudaStream_t stream, std::int32_t pad = 0) {
        detail::check_table_shape(seqs.size(), max_blocks_per_seq, geometry_.max_blocks);
        staging_.resize(seqs.size() * max_blocks_per_seq);
        pack_block_tables(seqs, max_blocks_per_seq, staging_, pad);
        copy_.upload(device_out, staging_.data(), staging_.size() * sizeof(std::int32_t), stream);
    }

    /// Address of block `block`'s K (or V) for layer `layer`: its element [token 0, head 0, 0].
    /// Throws invalid_argument for a layer or block outside the cache, or a part the layout does
    /// not have (V of mla).
    [[nodiscard]] std::byte* address(std::uint32_t layer, kv_part part, std::int32_t block) const {
        detail::check_address<Layout>(geometry_, layer, part, block);
        return pool_.base() + Layout::offset(geometry_, layer, part, static_cast<std::uint32_t>(block));
    }
    [[nodiscard]] std::byte* key(std::uint32_t layer, std::int32_t block) const { return address(layer, kv_part::key, block); }
    [[nodiscard]] std::byte* value(std::uint32_t layer, std::int32_t block) const {
        return address(layer, kv_part::value, block);
    }

    /// Layer `layer`'s K or V as a strided [max_blocks, block_tokens, kv_heads, head_dim] tensor,
    /// for every layout: the strides (Layout::strides) say the order in memory (HND layouts:
    /// head stride block_tokens x head_dim; packed_kv: a view into packed_tensor(layer); mla:
    /// [max_blocks, block_tokens, 1, latent], the key only). Element [b, t, h, d] lies at
    /// address(layer, part, b) + (t * strides[1] + h * strides[2] + d) elements.
    /// Throws invalid_argument as address() does.
    [[nodiscard]] kv_tensor tensor(std::uint32_t layer, kv_part part) const {
        return detail::layer_tensor<Layout>(geometry_, address(layer, part, 0), pool_.device(),
                                            static_cast<std::int64_t>(geometry_.row_elements()));
    }

    /// Quantized KV (kv_geometry::scales): layer `layer`'s scales of K or V as a strided
    /// [max_blocks, block_tokens, kv_heads, head_dim / scales.group] tensor of scales.type, in the
    /// order of the data (each block's scales follow its data: block stride = tensor()'s in
    /// bytes). Scale [b, t, h, j] goes with data values [b, t, h, j * group, (j + 1) * group).
    /// Throws invalid_argument for a geometry without scales, or as address() does.
    [[nodiscard]] kv_tensor scale_tensor(std::uint32_t layer, kv_part part) const {
        if (geometry_.scales.group == 0) {
            throw invalid_argument("scale_tensor: the cache's geometry has no scales (kv_geometry::scales.group is 0)");
        }
        return detail::scale_tensor<Layout>(geometry_, address(layer, part, 0) + geometry_.block_data_bytes(),
                                            pool_.device());
    }

    /// packed_kv layouts: layer `layer`'s K and V together as one strided
    /// [max_blocks, block_tokens, kv_heads, 2 x head_dim] tensor (K in [..., :head_dim], V in
    /// [..., head_dim:]); permute(0, 2, 1, 3) gives vLLM's [blocks, heads, tokens, 2 x head_dim]
    /// as it lies in memory. Throws invalid_argument for a layer outside the cache.
    [[nodiscard]] kv_tensor packed_tensor(std::uint32_t layer) const
        requires(Layout::packs_kv)
    {
        return detail::layer_tensor<Layout>(geometry_, address(layer, kv_part::key, 0), pool_.device(),
                                            2 * static_cast<std::int64_t>(geometry_.row_elements()));
    }

    // --- sequence-slot layouts (sequence_contiguous): a contiguous run per sequence ---

    /// Sequence `seq`'s K or V of layer `layer` as one contiguous tensor [1, tokens(seq),
    /// kv_heads, head_dim] (dense and row-major: strides Layout::sequence_strides, after a
    /// leading dimension of one "block" holding the whole sequence, so indexing matches
    /// tensor()'s), what a standard non-paged attention kernel takes: no gather. Its memory is
    /// the sequence's blocks in order; the pointer stays valid (and the run grows in place) while
    /// the sequence lives. Throws invalid_argument as address() does, or for an unknown sequence.
    [[nodiscard]] kv_tensor sequence_tensor(seq_id seq, std::uint32_t layer, kv_part part) const
        requires slotted
    {
        const sequence& s = find(seq);
        std::byte* first = address(layer, part, static_cast<std::int32_t>(std::size_t{s.slot} * blocks_.slot_blocks()));
        return detail::sequence_tensor<Layout>(geometry_, first, pool_.device(), s.tokens, blocks_.slot_blocks());
    }
    /// The slot of `seq`: its blocks are slot * slot_blocks() + 0, 1, ...
    [[nodiscard]] std::uint32_t sequence_slot(seq_id seq) const requires slotted { return find(seq).slot; }
    /// Blocks per slot (max_tokens_per_sequence in whole blocks), slots in all and free ones.
    [[nodiscard]] std::uint32_t slot_blocks() const noexcept requires slotted { return blocks_.slot_blocks(); }
    [[nodiscard]] std::size_t slot_count() const noexcept requires slotted { return blocks_.slot_count(); }
    [[nodiscard]] std::size_t free_slots() const noexcept requires slotted { return blocks_.free_slots(); }

    // --- stream order of copies queued outside the cache (copy_blocks, vmmpp/kv/transfer.hpp) ---

    /// Before work queued on `stream` (of the cache's device) writes the live, unshared `blocks`:
    /// `stream` waits for the reads queued before each block's last free, as append's does, and
    /// room is made for fence_blocks' fence. Host memory: nothing to do.
    /// Throws: cuda_error, std::bad_alloc: nothing changed but waits queued (they only delay).
    void order_outside_write(std::span<const std::int32_t> blocks, cudaStream_t stream) {
        memory_.reserve_fences(blocks);
        memory_.order_writes_after_reads(blocks, stream);
    }
    /// Before `stream` reads live `blocks` whose bytes a copy on another stream may have written
    /// (a prefix cache's compaction moves, vmmpp/kv/relocate.hpp): `stream` waits for the work
    /// fenced on them. Host memory: nothing to do.
    /// Throws: cuda_error (nothing changed but waits queued: they only delay).
    void order_reads_after_fences(std::span<const std::int32_t> blocks, cudaStream_t stream) {
        memory_.order_writes_after_reads(blocks, stream);
    }
    /// Before work queued outside the cache reads the live `blocks`: room for fence_blocks' fence.
    /// Throws: std::bad_alloc (nothing changed).
    void order_outside_read(std::span<const std::int32_t> blocks) { memory_.reserve_fences(blocks); }
    /// After that work (read or write), queued before `f` (pool().record_fence): whoever lets go
    /// of any of `blocks` last waits for it. Once per order_outside_* of the same blocks.
    void fence_blocks(std::span<const std::int32_t> blocks, pool_fence f) noexcept { memory_.add_fence(blocks, f); }

    [[nodiscard]] const kv_geometry& geometry() const noexcept { return geometry_; }
    /// The stream of the cache's own device work (kv_cache_options::stream).
    [[nodiscard]] cudaStream_t stream() const noexcept { return options_.stream; }
    [[nodiscard]] const pool_type& pool() const noexcept { return pool_; }
    [[nodiscard]] pool_type& pool() noexcept { return pool_; }
    /// The live sequences by id, ascending (see vmmpp/kv/views.hpp for views over them).
    [[nodiscard]] const auto& sequence_map() const noexcept { return sequences_; }

    // --- sleep and wake (detail::cache_sleep, vmmpp/kv/sleep.hpp) ---

    /// Whether the cache sleeps: its live blocks are in a host buffer and its pool gave its
    /// device memory back. Sequences, block tables, addresses and tensors stay as they were.
    [[nodiscard]] bool asleep() const noexcept { return sleep_.asleep(); }

    /// Bytes sleep() would copy now: the live blocks' pieces (Layout::for_each_piece), merged
    /// into contiguous ranges. The host buffer given to sleep must hold at least this.
    /// Throws: std::bad_alloc.
    [[nodiscard]] std::size_t sleep_bytes() const { return sleep_.bytes(*this); }

    /// sleep(host, kv_cache_options::stream).
    sleep_result sleep(std::span<std::byte> host)
        requires Config::growth_type::is_elastic
    {
        return sleep(host, options_.stream);
    }

    /// Puts the cache to sleep: copies every live block to `host` (sleep_bytes() bytes, ranges
    /// back to back in offset order; pinned memory copies fastest), waits for the copies, then
    /// gives back all of the pool's memory, keeping the address reservation and every sequence.
    /// `host` must stay untouched until wake(); the engine's work on the blocks must be queued on
    /// `stream` (or finished). Until wake(), append, truncate, free and sleep throw
    /// cache_asleep; reads (tables, slots, addresses, tensors) and fork stay valid.
    /// Throws: cache_asleep, invalid_argument (`host` too small), cuda_error (a copy failed): the
    /// cache awake and unchanged; cuda_error or retired_memory while memory goes back: it sleeps
    /// all the same. Waits: for `stream`, the cache's own copies and every fence of the pool.
    sleep_result sleep(std::span<std::byte> host, cudaStream_t stream)
        requires Config::growth_type::is_elastic
    {
        return sleep_.sleep(*this, host, stream);
    }

    /// wake(kv_cache_options::stream).
    sleep_result wake()
        requires Config::growth_type::is_elastic
    {
        return wake(options_.stream);
    }

    /// Wakes the cache: holds every live block's memory again at the same offsets, copies the
    /// blocks back from the host buffer and waits for the copies (on `stream`). Ids, tables,
    /// addresses and tensors are as before the sleep. An awake cache is left as it is (all zeros).
    /// Throws: over_quota, out_of_memory, retired_memory, cuda_error: the cache still sleeps, with
    /// the memory this call committed given back, so wake() may be called again.
    sleep_result wake(cudaStream_t stream)
        requires Config::growth_type::is_elastic
    {
        return sleep_.wake(*this, stream);
    }

private:
    struct sequence {
        std::vector<std::int32_t> blocks;
        std::size_t tokens = 0;
        std::uint32_t slot = 0;  // its slot in the block-id policy (0 where there are none)
    };
    struct plan {
        std::size_t total_blocks;  // blocks the sequence will have
        std::size_t new_blocks;    // fresh blocks to take (including a copy-on-write target)
        bool copy_on_write;
    };

    static invalid_argument unknown_sequence(seq_id seq) {
        return invalid_argument("unknown sequence " + std::to_string(seq) + " (never added, or already freed)");
    }

    sequence& find(seq_id seq) { return find_in(sequences_, seq); }
    const sequence& find(seq_id seq) const { return find_in(sequences_, seq); }
    template <class Map>
    static auto& find_in(Map& sequences, seq_id seq) {
        auto it = sequences.find(seq);
        if (it == sequences.end()) {
            throw unknown_sequence(seq);
        }
        return it->second;
    }

    /// Throws invalid_argument, named after `operation`, where the block-id policy cannot share
    /// blocks between holders (its check_fork throws: sequence_contiguous).
    void check_shares(const char* operation) const {
        try {
            blocks_.check_fork(next_id_, Layout::name);
        } catch (const invalid_argument& e) {
            throw invalid_argument(std::string(operation) + " refused (blocks cannot be shared): " + e.what());
        }
    }

    plan plan_append(const sequence& s, std::size_t n_tokens) const {
        const std::size_t max_tokens = std::size_t{geometry_.max_blocks} * geometry_.block_tokens;
        if (n_tokens > max_tokens - s.tokens) {
            throw out_of_blocks(geometry_.blocks_for(s.tokens) + geometry_.blocks_for(n_tokens),
                                blocks_.free_blocks(), blocks_.max_blocks());
        }
        plan p{};
        p.total_blocks = geometry_.blocks_for(s.tokens + n_tokens);
        p.new_blocks = p.total_blocks - s.blocks.size();
        p.copy_on_write = s.tokens % geometry_.block_tokens != 0 && blocks_.refs(s.blocks.back()) > 1;
        p.new_blocks += p.copy_on_write ? 1 : 0;
        return p;
    }

    /// Charges the quota for every uncommitted page under the fresh blocks of an append at once
    /// (pool::prepay): a refusal comes before any commit, and says what the append needed.
    auto prepay_append(seq_id seq, std::size_t n_tokens, const std::vector<std::int32_t>& fresh) {
        try {
            return pool_.prepay(memory_.merged_pieces_for_hold(fresh));
        } catch (const over_quota& e) {
            throw over_quota(e.which(), e.requested(), e.in_use(), e.limit(),
                             "append of " + std::to_string(n_tokens) + " tokens to sequence " + std::to_string(seq));
        }
    }

    /// Copies every layer's K and V of block `from` into block `to` (Layout::copy_shape's rows),
    /// queued on `stream` after the work there (the engine's writes of `from`'s tokens); whoever
    /// lets go of either block last waits for the copy too.
    void copy_block(std::int32_t from, std::int32_t to, cudaStream_t stream) {
        const auto shape = Layout::copy_shape(geometry_);
        const std::byte* src = address(0, kv_part::key, from);
        std::byte* dst = address(0, kv_part::key, to);
        memory_.copy_queued(stream);
        copy_.copy(stream, "cuMemcpyAsync(copy-on-write)", [&](auto&& copy) {
            for (std::size_t r = 0; r < shape.rows; ++r) {
                copy(dst + r * shape.pitch, src + r * shape.pitch, shape.width);
            }
        });
        memory_.copied(from, to, stream);
    }

    kv_geometry geometry_;
    kv_cache_options options_;
    pool_type pool_;
    block_ids_of<Layout> blocks_;             // which ids blocks get, and their reference counts
    detail::device_copy<backing_type> copy_;  // outlives memory_, whose end may record a fence
    detail::block_memory<pool_type, Layout> memory_;  // the pool's memory under the blocks, in stream order
    std::map<seq_id, sequence> sequences_;
    seq_id next_id_ = 0;
    std::uint64_t cow_copies_ = 0;
    std::vector<std::int32_t> staging_;
    detail::cache_sleep<kv_cache> sleep_;
};

} // namespace vmmpp
