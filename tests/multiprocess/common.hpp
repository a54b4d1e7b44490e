// What test_process_budget and vmmpp_mp_helper share: the page size, the pool configuration,
// and a second mapping of a budget's segment through the detail layer, for what only tests do to
// a segment (lock it and die, rewrite its header, act for a made-up process).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "vmmpp/backing/host.hpp"
#include "vmmpp/growth/page_granular.hpp"
#include "vmmpp/pool.hpp"
#include "vmmpp/quota/detail/budget_share.hpp"
#include "vmmpp/quota/detail/segment_open.hpp"
#include "vmmpp/quota/detail/share_registration.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"
#include "vmmpp/quota/process_budget.hpp"

namespace vmmpp_mp {

/// Small pages keep a test's memory small: 64 KiB (a multiple of every OS page size).
inline constexpr std::size_t page = std::size_t{64} << 10;

using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::process_quota>;
using pool = vmmpp::elastic_pool<config>;

/// A pool of `pages` pages that keeps up to `spare_pages` released pages committed as spares.
inline std::unique_ptr<pool> make_pool(std::size_t pages, vmmpp::process_quota quota, std::size_t spare_pages = 0) {
    return std::make_unique<pool>(pages * page, vmmpp::host_options{.page_bytes = page},
                                  vmmpp::page_granular{.spare_pages = spare_pages}, std::move(quota));
}

/// This process's own mapping of the segment `name` ("/name", as process_budget::name() gives
/// it), attached through the detail layer as process_budget::open does, minus the trust opt-ins
/// and the reclaim. Its lock, header and tables are the budget's: the mutex lives in the segment.
inline std::shared_ptr<vmmpp::detail::pb::segment> attach_segment(const std::string& name) {
    auto s = vmmpp::detail::pb::attach(name, {}, std::chrono::milliseconds(5000), vmmpp::current_process_identity(),
                                       [](const vmmpp::detail::pb::trust_refusal& r) {
                                           return std::runtime_error(std::string("untrusted segment: ") + r.why);
                                       });
    if (!s) {
        throw std::runtime_error("no segment " + name);
    }
    return s;
}

} // namespace vmmpp_mp
