// capi/kv_erased.cpp: kv_erased.hpp's factories: the layout and the configuration found by name,
// then the caches of that configuration (kv_erased_impl.hpp's config_caches, instantiated in
// kv_erased_fixed.cpp, kv_erased_elastic.cpp, kv_erased_mapped_ahead.cpp), and the prefix caches
// and host tiers over them, one each.
#include <string>
#include <type_traits>

#include "kv_erased_impl.hpp"

namespace vmmpp::erased {
namespace {

/// Old names still accepted, and the name in vmmpp::named_configs each stands for.
constexpr std::pair<std::string_view, std::string_view> config_aliases[] = {
    {"elastic_pages", "elastic_page"},  // the serving examples, scripts and bench/results use it
};

/// Throws invalid_argument, as dispatch_by_name does, for a layout not in List: a wrong layout
/// is reported before a wrong configuration, whichever list is searched first.
template <class List>
void check_layout(std::string_view layout, std::string_view what) {
    vmmpp::dispatch_by_name<List>(layout, what, []<class L>(std::type_identity<L>) {});
}

} // namespace

std::string_view canonical_config_name(std::string_view name) noexcept {
    for (const auto& [alias, canonical] : config_aliases) {
        if (name == alias) {
            return canonical;
        }
    }
    return name;
}

bool has_shared_budget(std::string_view config) {
    return vmmpp::dispatch_by_name<vmmpp::named_configs>(
        canonical_config_name(config), "configuration",
        []<class C>(std::type_identity<C>) { return is_budgeted_config<C>::value; });
}

std::shared_ptr<cache_base> make_cache(std::string_view config, std::string_view layout, const kv_geometry& g,
                                       const backing_choice& backing, std::uint64_t budget_bytes) {
    check_layout<vmmpp::kv_layouts>(layout, "layout");
    if (budget_bytes != 0 && !has_shared_budget(config)) {
        // A configuration without a budget of its own: the host backing takes one (a budget of
        // this cache alone); the others would ignore it, so they refuse it rather than do that.
        if (canonical_config_name(config) != vmmpp::type_name<vmmpp::host_config>) {
            throw vmmpp::invalid_argument("budget_bytes: the '" + std::string(config) +
                                          "' configuration is charged to no budget (its quota is unlimited); the "
                                          "configurations under a budget are " +
                                          vmmpp::type_names<vmmpp::budgeted_named_configs>() + " and host");
        }
        vmmpp::budget own(budget_bytes);  // kept alive by the cache's share
        return make_cache_in_budget(config, layout, g, backing, own.register_model("kv", budget_bytes));
    }
    return vmmpp::dispatch_by_name<vmmpp::named_configs>(
        canonical_config_name(config), "configuration",
        [&]<class C>(std::type_identity<C>) { return detail::config_caches<C>::named(layout, g, backing, budget_bytes); });
}

std::shared_ptr<cache_base> make_cache_in_budget(std::string_view config, std::string_view layout,
                                                 const kv_geometry& g, const backing_choice& backing,
                                                 shared_budget quota) {
    check_layout<vmmpp::kv_layouts>(layout, "layout");
    return vmmpp::dispatch_by_name<budget_configs>(
        canonical_config_name(config), "configuration for a budget", [&]<class C>(std::type_identity<C>) {
            return detail::config_caches<C>::in_budget(layout, g, backing, std::move(quota));
        });
}

std::shared_ptr<cache_base> make_cache_in_process_budget(std::string_view config, std::string_view layout,
                                                         const kv_geometry& g, const backing_choice& backing,
                                                         process_quota quota) {
    // The four layouts with K and V in tensors of their own (vmmpp::split_kv_layouts).
    check_layout<vmmpp::split_kv_layouts>(layout, "layout for a process budget");
    return vmmpp::dispatch_by_name<budget_configs>(
        canonical_config_name(config), "configuration for a process budget", [&]<class C>(std::type_identity<C>) {
            return detail::config_caches<C>::in_process_budget(layout, g, backing, std::move(quota));
        });
}

std::shared_ptr<prefix_base> make_prefix_cache(const std::shared_ptr<cache_base>& cache,
                                               const prefix_cache_options& options, bool lend) {
    std::unique_ptr<prefix_base> made;
    {
        std::lock_guard lock(cache->mutex);
        if (cache->has_prefix) {
            throw vmmpp::invalid_argument(
                "the cache has a prefix cache already (one per cache: a block two of them held would never be "
                "evictable)");
        }
        made = cache->make_prefix(options, lend);
        cache->has_prefix = true;
    }
    // Outside the lock: a shared_ptr that cannot allocate its count calls the deleter, which locks.
    return std::shared_ptr<prefix_base>(made.release(), [cache](prefix_base* p) noexcept {
        p->stop_lending();  // outside the lock: a reclaim in progress waits for it
        // The prefix cache's destructor releases its blocks: a change to the cache, under its lock.
        std::lock_guard lock(cache->mutex);
        delete p;
        cache->has_prefix = false;
    });
}

std::shared_ptr<tier_base> make_host_tier(const std::shared_ptr<cache_base>& cache,
                                          const std::shared_ptr<prefix_base>& prefix, std::size_t max_blocks,
                                          cudaStream_t stream) {
    std::unique_ptr<tier_base> made;
    {
        std::lock_guard lock(cache->mutex);
        if (prefix->has_tier) {
            throw vmmpp::invalid_argument(
                "the prefix cache has a tier already (one per prefix cache: its evicted blocks go to one tier)");
        }
        made = prefix->make_tier(max_blocks, stream);
        prefix->has_tier = true;
    }
    // The deleter holds the prefix cache the tier refers to, and drops it only after the tier went
    // (the prefix cache's own deleter takes the lock, so the lock is let go of first).
    return std::shared_ptr<tier_base>(made.release(), [cache, prefix](tier_base* t) noexcept {
        // The prefix cache stops spilling into the tier, and the tier waits for its copies.
        std::lock_guard lock(cache->mutex);
        delete t;
        prefix->has_tier = false;
    });
}

} // namespace vmmpp::erased