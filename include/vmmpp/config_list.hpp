// vmmpp/config_list.hpp: every named configuration of vmmpp/config.hpp, once, with its name
// (type_name<C>: "static" for static_config, ...). The tests and benchmarks take the named
// configurations from here; a new named configuration is added to config.hpp, to
// `named_configs` and given its name below.
//
//   named_configs            every named configuration, in config.hpp's order
//   device_named_configs     those whose memory is on a GPU (all but host_config)
//   budgeted_named_configs   those charged to a budget shared by models (quota shared_budget)
//   with_quota_t<C, Q>       C with quota policy Q instead of its own (the C ABI's process-budget
//                            caches: with_quota_t<elastic_config, process_quota>)
#pragma once

#include <string_view>
#include <type_traits>

#include "vmmpp/config.hpp"
#include "vmmpp/type_list.hpp"

namespace vmmpp {

using named_configs = type_list<static_config, elastic_config, elastic_mapped_ahead_config, elastic_page_config,
                                gh200_config, host_config>;

template <>
inline constexpr std::string_view type_name<static_config> = "static";
template <>
inline constexpr std::string_view type_name<elastic_config> = "elastic";
template <>
inline constexpr std::string_view type_name<elastic_mapped_ahead_config> = "elastic_mapped_ahead";
template <>
inline constexpr std::string_view type_name<elastic_page_config> = "elastic_page";
template <>
inline constexpr std::string_view type_name<gh200_config> = "gh200";
template <>
inline constexpr std::string_view type_name<host_config> = "host";

/// Whether C's memory is GPU memory (its backing is device accessible).
template <class C>
struct is_device_config : std::bool_constant<has_property<typename C::backing_type, device_accessible>> {};

using device_named_configs = filter_t<named_configs, is_device_config>;

/// Whether C's memory is charged to a budget shared by models (its quota is shared_budget): the
/// configurations a cross-process budget (vmmpp::process_quota) can stand in for.
template <class C>
struct is_budgeted_config : std::is_same<typename C::quota_type, shared_budget> {};

using budgeted_named_configs = filter_t<named_configs, is_budgeted_config>;

namespace detail {
template <class Config, class Quota>
struct with_quota;
template <class Backing, class Growth, class Old, class Mutex, class Quota>
struct with_quota<pool_config<Backing, Growth, Old, Mutex>, Quota> {
    using type = pool_config<Backing, Growth, Quota, Mutex>;
};
} // namespace detail

/// Config (a pool_config) with quota policy Quota instead of its own; backing, growth and mutex kept.
template <class Config, class Quota>
using with_quota_t = typename detail::with_quota<Config, Quota>::type;

static_assert(named_configs::size == 6 && device_named_configs::size == 5 && budgeted_named_configs::size == 3);
static_assert(std::is_same_v<with_quota_t<elastic_config, unlimited>, pool_config<vmm, adaptive_extents, unlimited>>);

} // namespace vmmpp
