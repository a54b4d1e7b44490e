// capi/kv_erased.hpp: a vmmpp::kv_cache, its prefix cache and its host tier behind virtual
// interfaces, the configuration and the layout chosen by name at run time (from the one list of
// each: vmmpp::named_configs, vmmpp/config_list.hpp; vmmpp::kv_layouts, vmmpp/kv/layout_list.hpp).
// What the C ABI (vmmpp_kv_capi.cpp) and the Python module (python/src/vmmpp_module.cpp) both
// stand on: every instantiation lives in kv_erased.cpp, compiled once for both (target
// vmmpp_kv_erased), so neither binding instantiates a cache itself.
//
// Not thread safe by itself: the caller holds cache_base::mutex around every call on a cache,
// its prefix cache and its tier (the C ABI and the Python module both do).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmmpp/config.hpp"
#include "vmmpp/config_list.hpp"
#include "vmmpp/interop/dlpack.hpp"
#include "vmmpp/interop/nixl.hpp"
#include "vmmpp/interop/shared_pages.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/prefix/lending.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/quota/process_budget.hpp"
#include "vmmpp/stats.hpp"
#include "vmmpp/tier/host_tier.hpp"

namespace vmmpp::erased {

/// What a host tier (vmmpp::host_tier) does, whatever its prefix cache's type.
class tier_base {
public:
    virtual ~tier_base() = default;
    virtual tiered_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                                   cudaStream_t stream) = 0;
    /// {gpu_tokens, host_tokens}.
    virtual std::pair<std::size_t, std::size_t> lookup(std::span<const std::int32_t> tokens,
                                                       std::span<const std::uint64_t> extra) const = 0;
    virtual std::uint64_t swap_out(seq_id seq, cudaStream_t stream) = 0;
    virtual seq_id swap_in(std::uint64_t id, cudaStream_t stream) = 0;
    virtual void drop_swapped(std::uint64_t id) = 0;
    virtual std::size_t store_ahead(std::size_t max_blocks) = 0;
    virtual std::size_t swapped_tokens(std::uint64_t id) const = 0;
    virtual void synchronize() const = 0;
    virtual bool idle() const = 0;
    virtual void stream_waits_for_copies(cudaStream_t stream) const = 0;
    virtual host_tier_stats stats() const = 0;
};

/// What a prefix cache (vmmpp::prefix_cache) does, whatever its cache's type.
class prefix_base {
public:
    virtual ~prefix_base() = default;
    virtual std::size_t publish(seq_id seq, std::span<const std::int32_t> tokens,
                                std::span<const std::uint64_t> extra) = 0;
    virtual std::size_t lookup(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra) const = 0;
    virtual attached_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                                     cudaStream_t stream) = 0;
    /// on_stream: prefix_cache::append(seq, n, stream); else append(seq, n).
    virtual token_range append(seq_id seq, std::size_t n, cudaStream_t stream, bool on_stream) = 0;
    virtual void free(seq_id seq, cudaStream_t stream) = 0;
    virtual eviction_result evict(std::size_t n_blocks) = 0;
    virtual eviction_result evict_bytes(std::size_t bytes) = 0;
    virtual eviction_result clear() = 0;
    virtual prefix_cache_stats stats() const = 0;
    virtual std::size_t block_bytes() const noexcept = 0;
    virtual std::vector<prefix_event> drain_events() = 0;
    /// What lending gave other models (zeros when it does not lend).
    virtual vmmpp::lending_stats lending_stats() const noexcept = 0;
    /// Ends lending (waits for a reclaim in progress): called without the cache's mutex, before
    /// the prefix cache goes.
    virtual void stop_lending() noexcept = 0;
    /// A host tier over this prefix cache (vmmpp::host_tier): it receives the evicted blocks
    /// until it goes, so it must go first.
    virtual std::unique_ptr<tier_base> make_tier(std::size_t max_blocks, cudaStream_t stream) = 0;

    /// Whether a tier is over this prefix cache now (one at most: evicted blocks go to one
    /// tier). Under the cache's mutex.
    bool has_tier = false;
};

/// A cache's use, in the figures of vmmpp_kv_stats.
struct cache_counts {
    std::uint64_t reserved_bytes = 0;   ///< address space of the pool
    std::uint64_t committed_bytes = 0;  ///< backed by memory now
    std::uint64_t used_blocks = 0;
    std::uint64_t free_blocks = 0;
    std::uint64_t sequences = 0;
    std::uint64_t cow_copies = 0;
};

/// What a cache does, whatever its configuration and layout.
class cache_base {
public:
    virtual ~cache_base() = default;
    virtual seq_id add_sequence() = 0;
    virtual token_range append(seq_id seq, std::size_t n) = 0;
    /// kv_cache::append(seq, n, stream): the new tokens are written by work queued on `stream`.
    virtual token_range append_on_stream(seq_id seq, std::size_t n, cudaStream_t stream) = 0;
    virtual seq_id fork(seq_id seq) = 0;
    virtual void truncate(seq_id seq, std::size_t n, cudaStream_t stream) = 0;
    virtual void free(seq_id seq, cudaStream_t stream) = 0;
    virtual std::size_t tokens(seq_id seq) const = 0;
    virtual cache_counts stats() const = 0;
    /// stats_snapshot::add_cache under `name` (its model's statistics too when it has a budget).
    virtual void add_to(stats_snapshot& snapshot, std::string name) const = 0;
    virtual void slot_mapping(seq_id seq, std::size_t first, std::span<std::int64_t> out) const = 0;
    virtual std::span<const std::int32_t> block_table(seq_id seq) const = 0;
    virtual void pack_block_tables(std::span<const seq_id> seqs, std::size_t max_blocks_per_seq,
                                   std::span<std::int32_t> out, std::int32_t pad) const = 0;
    virtual std::byte* address(std::uint32_t layer, kv_part part, std::int32_t block) const = 0;
    /// Waits for the legacy default stream (device memory) and gives back what waited for it.
    virtual void synchronize() = 0;
    /// kv_cache::collect: gives back memory whose GPU work completed; never waits.
    virtual std::size_t collect() = 0;
    virtual std::size_t trim() = 0;
    /// kv_cache::sleep_bytes, sleep, wake, asleep.
    virtual std::size_t sleep_bytes() const = 0;
    virtual sleep_result sleep(std::span<std::byte> host, cudaStream_t stream) = 0;
    virtual sleep_result wake(cudaStream_t stream) = 0;
    virtual bool asleep() const noexcept = 0;
    virtual DLDevice dlpack_device(bool managed_as_cuda) const = 0;
    virtual kv_tensor tensor(std::uint32_t layer, kv_part part) const = 0;
    /// sequence_contiguous: the dense run of a sequence; other layouts throw invalid_argument.
    virtual kv_tensor sequence_tensor(seq_id seq, std::uint32_t layer, kv_part part) const = 0;
    virtual bool host_accessible() const noexcept = 0;
    virtual bool device_accessible() const noexcept = 0;
    virtual const kv_geometry& geometry() const noexcept = 0;
    /// 2 (K and V) or 1 (mla: the latent only).
    virtual unsigned parts() const noexcept = 0;
    /// The span: its first byte, its size, its device (-1: host memory).
    virtual std::byte* base() const noexcept = 0;
    virtual std::size_t capacity() const noexcept = 0;
    virtual int device() const noexcept = 0;
    /// The pool's committed extents (what a transfer engine registers).
    virtual std::vector<committed_extent> committed_extents() const = 0;
    /// vmmpp::block_pieces of `blocks`.
    virtual std::vector<byte_range> block_pieces(std::span<const std::int32_t> blocks) const = 0;
    /// vmm configurations: every committed handle, exported for vmmpp::send_shared_pages.
    virtual shared_pages_export export_shared_pages() const = 0;
    /// vmmpp::copy_blocks from this cache into `dst`, which has the same configuration and layout
    /// (not const: the copy's fence goes on this cache's source blocks too).
    virtual void copy_blocks_to(std::span<const std::int32_t> src_blocks, cache_base& dst,
                                std::span<const std::int32_t> dst_blocks, cudaStream_t stream) = 0;
    /// A prefix cache over this cache; layouts that cannot share blocks throw invalid_argument.
    /// `lend`: lending to the cache's budget, its reclaims under `mutex`; a cache whose quota
    /// lends to no one throws invalid_argument.
    virtual std::unique_ptr<prefix_base> make_prefix(const prefix_cache_options& options, bool lend) = 0;

    /// Serialises the calls on this cache, its prefix cache and its tier (the cache is not
    /// thread safe by itself).
    std::mutex mutex;
    /// Whether a prefix cache is over this cache now (one at most: a block two prefix caches
    /// hold would never be evictable). Under `mutex`.
    bool has_prefix = false;
};

/// Where a cache's memory comes from beyond its configuration: the CUDA device (ignored by host
/// memory), the devices that may read and write it too (vmm_options::peer_devices) and what
/// reads of uncommitted address space do (vmm_options::unbacked). Peers and anything but
/// unbacked_access::fault are for the vmm configurations only; the others refuse them.
struct backing_choice {
    int device = 0;
    std::vector<int> peers{};
    unbacked_access unbacked = unbacked_access::fault;
};

/// The configurations a budget shared with other models takes (make_cache_in_budget,
/// make_cache_in_process_budget): those of named_configs under a shared_budget, and host_config
/// (CPU memory: tests and machines without a GPU).
using budget_configs = concat_t<budgeted_named_configs, type_list<host_config>>;

/// `name`, or the name in named_configs an old alias of it stands for ("elastic_pages").
std::string_view canonical_config_name(std::string_view name) noexcept;
/// Whether the named configuration (or alias) is charged to a shared budget (budgeted_named_configs).
/// Throws: invalid_argument for an unknown name, listing the valid ones.
bool has_shared_budget(std::string_view config);

/// A cache of the named configuration (named_configs, or an alias) and layout (kv_layouts).
/// Configurations under a shared_budget get a budget of their own of budget_bytes (0: the whole
/// span, in 2 MiB pages); host (host_config) a budget of its own of budget_bytes when it is not 0;
/// the others (static, gh200: charged to no budget) refuse a budget_bytes other than 0.
/// Throws: invalid_argument (an unknown name, listing the valid ones; a backing_choice the
/// configuration cannot take), and what the kv_cache constructor throws.
std::shared_ptr<cache_base> make_cache(std::string_view config, std::string_view layout, const kv_geometry& g,
                                       const backing_choice& backing, std::uint64_t budget_bytes);
/// A cache of one of budget_configs and any layout, charged to `quota` (a model's share of a
/// vmmpp::budget).
std::shared_ptr<cache_base> make_cache_in_budget(std::string_view config, std::string_view layout,
                                                 const kv_geometry& g, const backing_choice& backing,
                                                 shared_budget quota);
/// A cache of one of budget_configs and one of split_kv_layouts, charged to `quota` (a model of a
/// cross-process vmmpp::process_budget).
std::shared_ptr<cache_base> make_cache_in_process_budget(std::string_view config, std::string_view layout,
                                                         const kv_geometry& g, const backing_choice& backing,
                                                         process_quota quota);

/// A prefix cache over `cache` (one per cache), `lend`ing to the cache's budget as
/// make_prefix says. Takes the cache's mutex; so does the returned pointer's deleter, after it
/// stopped lending (outside the mutex: a reclaim in progress takes it). The pointer holds the cache.
/// Throws: invalid_argument (a prefix cache over `cache` already, and make_prefix's refusals).
std::shared_ptr<prefix_base> make_prefix_cache(const std::shared_ptr<cache_base>& cache,
                                               const prefix_cache_options& options, bool lend);
/// A host tier of max_blocks blocks over `prefix` (one per prefix cache; make_tier), copies on
/// `stream`. Takes the cache's mutex; so does the returned pointer's deleter, which then drops
/// the tier's references to the prefix cache and the cache (the prefix cache may go with it).
/// Throws: invalid_argument (a tier over `prefix` already), and what vmmpp::host_tier throws.
std::shared_ptr<tier_base> make_host_tier(const std::shared_ptr<cache_base>& cache,
                                          const std::shared_ptr<prefix_base>& prefix, std::size_t max_blocks,
                                          cudaStream_t stream);

} // namespace vmmpp::erased
