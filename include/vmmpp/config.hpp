// vmmpp/config.hpp: the named configurations, and how to state your own.
//
//   | name                        | backing             | growth                         | quota         |
//   | static_config               | device (cudaMalloc) | preallocated                   | unlimited     |
//   | elastic_config              | vmm                 | adaptive_extents               | shared_budget |
//   | elastic_mapped_ahead_config | vmm                 | mapped_ahead<adaptive_extents> | shared_budget |
//   | elastic_page_config         | vmm                 | page_granular                  | shared_budget |
//   | gh200_config                | managed_prefetch<>  | chunked<16>                    | unlimited     |
//   | host_config                 | host                | page_granular                  | unlimited     |
//   | pinned_host_config          | pinned_host         | preallocated                   | unlimited     |
//
// Your own: `using my_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::chunked<16>,
// vmmpp::shared_budget>;` Any type that models vmmpp::backing, vmmpp::growth_policy and
// vmmpp::quota_policy fits; pool_config rejects a combination that makes no sense with one line.
#pragma once

#include "vmmpp/backing/device.hpp"
#include "vmmpp/backing/external.hpp"
#include "vmmpp/backing/host.hpp"
#include "vmmpp/backing/managed_prefetch.hpp"
#include "vmmpp/backing/pinned_host.hpp"
#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/growth/adaptive_extents.hpp"
#include "vmmpp/growth/chunked.hpp"
#include "vmmpp/growth/mapped_ahead.hpp"
#include "vmmpp/growth/page_granular.hpp"
#include "vmmpp/growth/preallocated.hpp"
#include "vmmpp/pool.hpp"
#include "vmmpp/quota/shared_budget.hpp"
#include "vmmpp/quota/unlimited.hpp"

namespace vmmpp {

/// The static layout: one cudaMalloc of the whole capacity, committed up front.
using static_config = pool_config<device, preallocated, unlimited>;
/// Physical memory follows the live blocks under a budget shared by models: held and given back
/// in 2 MiB pages, committed in extents that grow up to 512 MiB (one handle each) while the
/// cache grows fast, so a burst costs the driver per large handle, not per page
/// (vmmpp/growth/adaptive_extents.hpp).
using elastic_config = pool_config<vmm, adaptive_extents, shared_budget>;
/// elastic_config with a background mapper: extents mapped ahead of demand and given back
/// lazily, so growth stays off the caller's critical path (vmmpp/growth/mapped_ahead.hpp).
/// It grows faster than elastic_config at p50 and holds more under churn (README, "Which
/// configuration"; figures in bench/results/).
using elastic_mapped_ahead_config = pool_config<vmm, mapped_ahead<adaptive_extents>, shared_budget>;
/// One 2 MiB handle per commit: the finest elasticity (every page goes back the moment it
/// empties) at the driver's cost per page (measured: docs/MEASUREMENTS.md).
using elastic_page_config = pool_config<vmm, page_granular, shared_budget>;
/// GH200: managed memory, prefetched to the GPU in 32 MiB chunks (16 pages of 2 MiB).
using gh200_config = pool_config<managed_prefetch<>, chunked<16>, unlimited>;
/// CPU memory with the elastic life of GPU memory: the CPU tier, and what CI runs for real.
using host_config = pool_config<host, page_granular, unlimited>;
/// Page-locked CPU memory, committed and registered once: the host tier's store
/// (vmmpp/tier/host_tier.hpp), whose copies to and from the GPU run at the PCIe limit.
using pinned_host_config = pool_config<pinned_host, preallocated, unlimited>;

} // namespace vmmpp
