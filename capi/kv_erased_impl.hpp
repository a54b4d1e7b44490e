// capi/kv_erased_impl.hpp: the templates behind kv_erased.hpp (for kv_erased*.cpp only): the
// cache, prefix cache and host tier of each configuration and layout (cache_impl, prefix_impl,
// tier_impl) and config_caches<Config>, the caches of one configuration. kv_erased.cpp dispatches
// by name; each configuration's caches are instantiated in one of kv_erased_fixed.cpp,
// kv_erased_elastic.cpp, kv_erased_mapped_ahead.cpp (extern templates below), so a build
// compiles them in parallel.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kv_erased.hpp"
#include "vmmpp/kv/layout_list.hpp"
#include "vmmpp/kv/transfer.hpp"

namespace vmmpp::erased::detail {

/// Whether Config's memory comes from the vmm backing (the configurations that take peers and
/// share their pages).
template <class Config>
struct is_vmm_config : std::is_same<typename Config::backing_type, vmmpp::vmm> {};

/// "elastic, elastic_mapped_ahead, elastic_page": the named vmm configurations, for messages.
inline std::string vmm_config_names() { return vmmpp::type_names<vmmpp::filter_t<vmmpp::named_configs, is_vmm_config>>(); }

/// The host tier of Prefix: page-locked host blocks behind a cache the GPU reads
/// (pinned_host_config), plain host blocks behind a cache in host memory (host_config: no
/// stream, copies at once).
template <class Prefix>
class tier_impl final : public tier_base {
    static constexpr bool on_device =
        vmmpp::has_property<typename Prefix::cache_type::backing_type, vmmpp::device_accessible>;
    using host_config = std::conditional_t<on_device, vmmpp::pinned_host_config, vmmpp::host_config>;

public:
    tier_impl(Prefix& prefix, std::size_t max_blocks, cudaStream_t stream)
        : tier_(prefix, vmmpp::host_tier_options{.max_blocks = max_blocks, .stream = stream}) {}

    vmmpp::tiered_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                                  cudaStream_t stream) override {
        return tier_.attach(tokens, extra, stream);
    }
    std::pair<std::size_t, std::size_t> lookup(std::span<const std::int32_t> tokens,
                                               std::span<const std::uint64_t> extra) const override {
        const auto r = tier_.lookup(tokens, extra);
        return {r.gpu_tokens, r.host_tokens};
    }
    std::uint64_t swap_out(vmmpp::seq_id seq, cudaStream_t stream) override { return tier_.swap_out(seq, stream); }
    vmmpp::seq_id swap_in(std::uint64_t id, cudaStream_t stream) override { return tier_.swap_in(id, stream); }
    void drop_swapped(std::uint64_t id) override { tier_.drop_swapped(id); }
    std::size_t store_ahead(std::size_t max_blocks) override { return tier_.store_ahead(max_blocks); }
    std::size_t swapped_tokens(std::uint64_t id) const override { return tier_.swapped_tokens(id); }
    void synchronize() const override { tier_.synchronize(); }
    bool idle() const override { return tier_.idle(); }
    void stream_waits_for_copies(cudaStream_t stream) const override { tier_.stream_waits_for_copies(stream); }
    vmmpp::host_tier_stats stats() const override { return tier_.stats(); }

private:
    vmmpp::host_tier<Prefix, host_config> tier_;
};

/// What a prefix_impl holds in place of a prefix_lending when its cache's quota cannot lend.
struct no_lending {
    [[nodiscard]] vmmpp::lending_stats stats() const noexcept { return {}; }
};

/// prefix_base over vmmpp::prefix_cache<Cache>, lending its evictable blocks when asked and the
/// cache's quota can (vmmpp::prefix_lending).
template <class Cache>
class prefix_impl final : public prefix_base {
    static constexpr bool can_lend = vmmpp::cache_reclaiming_quota<typename Cache::pool_type::quota_type> &&
                                     Cache::pool_type::growth_type::is_elastic;
    using lending_type =
        std::conditional_t<can_lend, vmmpp::prefix_lending<vmmpp::prefix_cache<Cache>>, no_lending>;

public:
    /// `lend_under`: lend evictable blocks to other models and processes of the cache's budget
    /// (vmmpp::prefix_lending), reclaims locking this mutex, the cache's (null: no lending).
    /// Throws: invalid_argument when the cache's quota lends nothing.
    prefix_impl(Cache& cache, const vmmpp::prefix_cache_options& options, std::mutex* lend_under)
        : prefix_(cache, options) {
        if (lend_under == nullptr) {
            return;
        }
        if constexpr (can_lend) {
            lending_ = std::make_unique<lending_type>(prefix_, *lend_under);
        } else {
            throw vmmpp::invalid_argument(
                "the cache's memory is not charged to a budget shared with other models (make it under a budget "
                "or a process budget), so there is no one to lend to");
        }
    }

    std::size_t publish(vmmpp::seq_id seq, std::span<const std::int32_t> tokens,
                        std::span<const std::uint64_t> extra) override {
        return prefix_.publish(seq, tokens, extra);
    }
    std::size_t lookup(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra) const override {
        return prefix_.lookup(tokens, extra);
    }
    vmmpp::attached_sequence attach(std::span<const std::int32_t> tokens, std::span<const std::uint64_t> extra,
                                    cudaStream_t stream) override {
        return prefix_.attach(tokens, extra, stream);
    }
    vmmpp::token_range append(vmmpp::seq_id seq, std::size_t n, cudaStream_t stream, bool on_stream) override {
        return on_stream ? prefix_.append(seq, n, stream) : prefix_.append(seq, n);
    }
    void free(vmmpp::seq_id seq, cudaStream_t stream) override { prefix_.free(seq, stream); }
    vmmpp::eviction_result evict(std::size_t n_blocks) override { return prefix_.evict(n_blocks); }
    vmmpp::eviction_result evict_bytes(std::size_t bytes) override { return prefix_.evict_bytes(bytes); }
    vmmpp::eviction_result clear() override { return prefix_.clear(); }
    vmmpp::prefix_cache_stats stats() const override { return prefix_.stats(); }
    std::size_t block_bytes() const noexcept override { return prefix_.block_bytes(); }
    std::vector<vmmpp::prefix_event> drain_events() override { return prefix_.drain_events(); }
    vmmpp::lending_stats lending_stats() const noexcept override {
        return lending_ ? lending_->stats() : vmmpp::lending_stats{};
    }
    void stop_lending() noexcept override { lending_.reset(); }
    std::unique_ptr<tier_base> make_tier(std::size_t max_blocks, cudaStream_t stream) override {
        return std::make_unique<tier_impl<vmmpp::prefix_cache<Cache>>>(prefix_, max_blocks, stream);
    }

private:
    vmmpp::prefix_cache<Cache> prefix_;
    /// After prefix_: unregistered before the prefix cache goes.
    std::unique_ptr<lending_type> lending_;
};

/// cache_base over vmmpp::kv_cache<Config, Layout>.
template <class Config, class Layout>
class cache_impl final : public cache_base {
public:
    using cache_type = vmmpp::kv_cache<Config, Layout>;
    template <class... Args>
    explicit cache_impl(Args&&... args) : cache_(std::forward<Args>(args)...) {}

    vmmpp::seq_id add_sequence() override { return cache_.add_sequence(); }
    vmmpp::token_range append(vmmpp::seq_id seq, std::size_t n) override { return cache_.append(seq, n); }
    vmmpp::token_range append_on_stream(vmmpp::seq_id seq, std::size_t n, cudaStream_t stream) override {
        return cache_.append(seq, n, stream);
    }
    vmmpp::seq_id fork(vmmpp::seq_id seq) override { return cache_.fork(seq); }
    void truncate(vmmpp::seq_id seq, std::size_t n, cudaStream_t stream) override { cache_.truncate(seq, n, stream); }
    void free(vmmpp::seq_id seq, cudaStream_t stream) override { cache_.free(seq, stream); }
    std::size_t tokens(vmmpp::seq_id seq) const override { return cache_.tokens(seq); }
    cache_counts stats() const override {
        cache_counts s{};
        const vmmpp::pool_stats p = cache_.pool().stats();
        s.reserved_bytes = p.reserved;
        s.committed_bytes = p.committed;
        s.used_blocks = cache_.used_blocks();
        s.free_blocks = cache_.free_blocks();
        s.sequences = cache_.sequence_count();
        s.cow_copies = cache_.cow_copies();
        return s;
    }
    void slot_mapping(vmmpp::seq_id seq, std::size_t first, std::span<std::int64_t> out) const override {
        cache_.slot_mapping(seq, first, out);
    }
    std::span<const std::int32_t> block_table(vmmpp::seq_id seq) const override { return cache_.block_table(seq); }
    void pack_block_tables(std::span<const vmmpp::seq_id> seqs, std::size_t max_blocks_per_seq,
                           std::span<std::int32_t> out, std::int32_t pad) const override {
        cache_.pack_block_tables(seqs, max_blocks_per_seq, out, pad);
    }
    std::byte* address(std::uint32_t layer, vmmpp::kv_part part, std::int32_t block) const override {
        return cache_.address(layer, part, block);
    }
    void synchronize() override {
        if constexpr (vmmpp::has_property<typename Config::backing_type, vmmpp::device_accessible>) {
            vmmpp::driver::check(::cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
        }
        (void)cache_.pool().synchronize();  // and memory whose release waited for the GPU goes back
    }
    std::size_t collect() override { return cache_.collect(); }
    std::size_t trim() override { return cache_.pool().trim(); }
    std::size_t sleep_bytes() const override { return cache_.sleep_bytes(); }
    vmmpp::sleep_result sleep(std::span<std::byte> host, cudaStream_t stream) override {
        if constexpr (Config::growth_type::is_elastic) {
            return cache_.sleep(host, stream);
        } else {
            throw vmmpp::invalid_argument(std::string("sleep: the '") + std::string(vmmpp::type_name<Config>) +
                                          "' configuration's memory is preallocated and never given back: sleep "
                                          "needs an elastic configuration");
        }
    }
    vmmpp::sleep_result wake(cudaStream_t stream) override {
        if constexpr (Config::growth_type::is_elastic) {
            return cache_.wake(stream);
        } else {
            throw vmmpp::invalid_argument(std::string("wake: the '") + std::string(vmmpp::type_name<Config>) +
                                          "' configuration never sleeps");
        }
    }
    bool asleep() const noexcept override { return cache_.asleep(); }
    void add_to(vmmpp::stats_snapshot& snapshot, std::string name) const override {
        snapshot.add_cache(std::move(name), cache_);
    }
    DLDevice dlpack_device(bool managed_as_cuda) const override { return vmmpp::dlpack_device(cache_, managed_as_cuda); }
    vmmpp::kv_tensor tensor(std::uint32_t layer, vmmpp::kv_part part) const override {
        return cache_.tensor(layer, part);
    }
    vmmpp::kv_tensor sequence_tensor(vmmpp::seq_id seq, std::uint32_t layer, vmmpp::kv_part part) const override {
        if constexpr (vmmpp::sequence_slot_layout<Layout>) {
            return cache_.sequence_tensor(seq, layer, part);
        } else {
            throw vmmpp::invalid_argument(std::string("the ") + Layout::name +
                                          " layout keeps no sequence contiguous: use sequence_contiguous");
        }
    }
    bool host_accessible() const noexcept override {
        return vmmpp::has_property<typename Config::backing_type, vmmpp::host_accessible>;
    }
    bool device_accessible() const noexcept override {
        return vmmpp::has_property<typename Config::backing_type, vmmpp::device_accessible>;
    }
    const vmmpp::kv_geometry& geometry() const noexcept override { return cache_.geometry(); }
    unsigned parts() const noexcept override { return Layout::parts; }
    std::byte* base() const noexcept override { return cache_.pool().base(); }
    std::size_t capacity() const noexcept override { return cache_.pool().capacity(); }
    int device() const noexcept override { return cache_.pool().device(); }
    std::vector<vmmpp::committed_extent> committed_extents() const override {
        return cache_.pool().committed_extents();
    }
    std::vector<vmmpp::byte_range> block_pieces(std::span<const std::int32_t> blocks) const override {
        return vmmpp::block_pieces(cache_, blocks);
    }
    vmmpp::shared_pages_export export_shared_pages() const override {
        if constexpr (is_vmm_config<Config>::value) {
            return cache_.pool().with_backing([](const vmmpp::vmm& b) { return vmmpp::export_shared_pages(b); });
        } else {
            throw vmmpp::invalid_argument("shared pages need a vmm configuration (" + vmm_config_names() + ")");
        }
    }
    void copy_blocks_to(std::span<const std::int32_t> src_blocks, cache_base& dst,
                        std::span<const std::int32_t> dst_blocks, cudaStream_t stream) override {
        auto* same = dynamic_cast<cache_impl*>(&dst);
        if (same == nullptr) {
            throw vmmpp::invalid_argument("copy_blocks: the caches differ in configuration or layout");
        }
        vmmpp::copy_blocks(cache_, src_blocks, same->cache_, dst_blocks, stream);
    }
    std::unique_ptr<prefix_base> make_prefix(const vmmpp::prefix_cache_options& options, bool lend) override {
        if constexpr (vmmpp::sequence_slot_layout<Layout>) {
            throw vmmpp::invalid_argument(std::string("the ") + Layout::name +
                                          " layout gives each sequence its own blocks, so no block can be shared; a "
                                          "prefix cache needs one of " +
                                          vmmpp::type_names<vmmpp::paged_kv_layouts>());
        } else {
            return std::make_unique<prefix_impl<cache_type>>(cache_, options, lend ? &mutex : nullptr);
        }
    }

private:
    cache_type cache_;
};

/// A cache of Config with Layout, whatever the configuration: the backing's options from
/// `choice` (peers and unbacked reads: vmm only), the quota given.
template <class Config, class Layout, class Quota>
std::shared_ptr<cache_base> build_cache(const vmmpp::kv_geometry& g, const backing_choice& choice, Quota quota) {
    using cfg = vmmpp::with_quota_t<Config, Quota>;
    using backing = typename cfg::backing_type;
    typename backing::options options{};
    if constexpr (is_vmm_config<cfg>::value) {
        options.device = choice.device;
        options.peer_devices = choice.peers;
        options.unbacked = choice.unbacked;
    } else {
        if (!choice.peers.empty()) {
            throw vmmpp::invalid_argument("peer devices are given to vmm configurations only (" + vmm_config_names() +
                                          "), not '" + std::string(vmmpp::type_name<Config>) + "'");
        }
        if (choice.unbacked != vmmpp::unbacked_access::fault) {
            throw vmmpp::invalid_argument("unbacked reads as zeros need a vmm configuration (" + vmm_config_names() +
                                          "), not '" + std::string(vmmpp::type_name<Config>) + "'");
        }
        if constexpr (requires { options.device = choice.device; }) {
            options.device = choice.device;  // device, managed_prefetch; host memory has no device
        }
    }
    return std::make_shared<cache_impl<cfg, Layout>>(g, std::move(options), typename cfg::growth_type{},
                                                     std::move(quota));
}

/// The caches of configuration Config (one of named_configs) in every layout: under a budget of
/// their own or none, and (budget_configs only) under a model's share of a vmmpp::budget or of a
/// process budget. The caller chose the configuration by name; these choose the layout.
template <class Config>
struct config_caches {
    /// A cache of Config in `layout` (kv_layouts). Under a shared_budget it gets a budget of
    /// budget_bytes (0: the whole span, in 2 MiB pages); the other quotas ignore budget_bytes.
    static std::shared_ptr<cache_base> named(std::string_view layout, const vmmpp::kv_geometry& g,
                                             const backing_choice& choice, std::uint64_t budget_bytes);
    /// A cache of Config in `layout` charged to a model of a vmmpp::budget.
    static std::shared_ptr<cache_base> in_budget(std::string_view layout, const vmmpp::kv_geometry& g,
                                                 const backing_choice& choice, vmmpp::shared_budget quota);
    /// A cache of Config in `layout` (split_kv_layouts) charged to a model of a process budget.
    static std::shared_ptr<cache_base> in_process_budget(std::string_view layout, const vmmpp::kv_geometry& g,
                                                         const backing_choice& choice, vmmpp::process_quota quota);

private:
    /// (kv_erased.cpp dispatches budgets over budget_configs only: a guard, never thrown there.)
    static vmmpp::invalid_argument not_for_budgets() {
        return vmmpp::invalid_argument("the '" + std::string(vmmpp::type_name<Config>) +
                                       "' configuration is not charged to a budget; those are " +
                                       vmmpp::type_names<budget_configs>());
    }
};

// Defined outside the class, so not inline: the extern templates below then keep every other
// translation unit from instantiating them (GCC instantiates inline members for inlining anyway).
template <class Config>
std::shared_ptr<cache_base> config_caches<Config>::named(std::string_view layout, const vmmpp::kv_geometry& g,
                                                         const backing_choice& choice, std::uint64_t budget_bytes) {
    return vmmpp::dispatch_by_name<vmmpp::kv_layouts>(layout, "layout", [&]<class L>(std::type_identity<L>) {
        using quota = typename Config::quota_type;
        if constexpr (std::is_same_v<quota, vmmpp::shared_budget>) {
            // The budget's state lives in the model's share, so the budget object may go.
            constexpr std::size_t page = std::size_t{2} << 20;
            const std::size_t limit = budget_bytes != 0 ? budget_bytes : (L::span_bytes(g) + page - 1) / page * page;
            vmmpp::budget budget(limit);
            return build_cache<Config, L>(g, choice, budget.register_model("kv", limit));
        } else {
            static_assert(std::is_same_v<quota, vmmpp::unlimited>,
                          "make_cache builds shared_budget and unlimited quotas: add this one");
            return build_cache<Config, L>(g, choice, quota{});
        }
    });
}

template <class Config>
std::shared_ptr<cache_base> config_caches<Config>::in_budget(std::string_view layout, const vmmpp::kv_geometry& g,
                                                             const backing_choice& choice,
                                                             vmmpp::shared_budget quota) {
    if constexpr (vmmpp::list_contains_v<Config, budget_configs>) {
        return vmmpp::dispatch_by_name<vmmpp::kv_layouts>(layout, "layout", [&]<class L>(std::type_identity<L>) {
            return build_cache<Config, L>(g, choice, std::move(quota));
        });
    } else {
        throw not_for_budgets();
    }
}

template <class Config>
std::shared_ptr<cache_base> config_caches<Config>::in_process_budget(std::string_view layout,
                                                                     const vmmpp::kv_geometry& g,
                                                                     const backing_choice& choice,
                                                                     vmmpp::process_quota quota) {
    if constexpr (vmmpp::list_contains_v<Config, budget_configs>) {
        return vmmpp::dispatch_by_name<vmmpp::split_kv_layouts>(
            layout, "layout for a process budget",
            [&]<class L>(std::type_identity<L>) { return build_cache<Config, L>(g, choice, std::move(quota)); });
    } else {
        throw not_for_budgets();
    }
}

// Instantiated once each, in kv_erased_fixed.cpp (static, gh200, host), kv_erased_elastic.cpp
// (elastic, elastic_page) and kv_erased_mapped_ahead.cpp: split by configuration, so that each
// pool type is compiled in one translation unit. A configuration added to named_configs goes to
// one of them too.
extern template struct config_caches<vmmpp::static_config>;
extern template struct config_caches<vmmpp::elastic_config>;
extern template struct config_caches<vmmpp::elastic_mapped_ahead_config>;
extern template struct config_caches<vmmpp::elastic_page_config>;
extern template struct config_caches<vmmpp::gh200_config>;
extern template struct config_caches<vmmpp::host_config>;

} // namespace vmmpp::erased::detail
