// What test_process_budget and vmmpp_mp_helper share: the page size, the pool configuration,
// and the test-only door into a process budget's segment.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <utility>

#include "vmmpp/backing/host.hpp"
#include "vmmpp/growth/page_granular.hpp"
#include "vmmpp/pool.hpp"
#include "vmmpp/quota/process_budget.hpp"

namespace vmmpp_mp {

/// Small pages keep a test's memory small: 64 KiB (a multiple of every OS page size).
inline constexpr std::size_t page = std::size_t{64} << 10;

using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::process_quota>;
using pool = vmmpp::elastic_pool<config>;

inline std::unique_ptr<pool> make_pool(std::size_t pages, vmmpp::process_quota quota) {
    return std::make_unique<pool>(pages * page, vmmpp::host_options{.page_bytes = page}, vmmpp::page_granular{},
                                  std::move(quota));
}

} // namespace vmmpp_mp

namespace vmmpp::detail {

/// Declared by process_budget.hpp, defined here: what only tests do to a segment.
struct process_budget_access {
    static const pb::segment& segment(const process_budget& b) { return *b.segment_; }
    static std::uint32_t model_index(const process_quota& q) { return q.model_; }
    static std::uint32_t record_index(const process_quota& q) { return q.record_; }
    /// Registers a model as if `who` had (to fake another process's record).
    static process_quota register_as(process_budget& b, std::string_view name, std::size_t limit,
                                     const process_identity& who) {
        return b.register_model_as(name, limit, who);
    }
};

} // namespace vmmpp::detail
