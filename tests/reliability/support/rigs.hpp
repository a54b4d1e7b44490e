// Reliability tests: the host configurations with a fault_injecting backing under the pool, the
// rig that builds a pool or a cache of one (owning its fault plan, budget and borrowed buffer),
// and the snapshots that prove "unchanged".
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/pool_factories.hpp"
#include "vmmpp/backing/fault_injecting.hpp"
#include "vmmpp/backing/zeroing.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

namespace vmmpp_rel {

using vmmpp_test::page;

/// `Config` with its backing wrapped in vmmpp::fault_injecting.
template <class Config>
struct faulty;
template <class Backing, class Growth, class Quota, class Mutex>
struct faulty<vmmpp::pool_config<Backing, Growth, Quota, Mutex>> {
    using type = vmmpp::pool_config<vmmpp::fault_injecting<Backing>, Growth, Quota, Mutex>;
};
template <class Config>
using faulty_t = typename faulty<Config>::type;

template <class T>
inline constexpr bool is_external = false;
template <class... P>
inline constexpr bool is_external<vmmpp::external<P...>> = true;

/// A pool or cache case: a host configuration (unwrapped) and a layout.
template <class Config, class Layout = vmmpp::layer_major>
struct fault_case {
    using base_config = Config;
    using config = faulty_t<Config>;
    using layout = Layout;
    using upstream = typename Config::backing_type;
    using cache = vmmpp::kv_cache<config, Layout>;
    using pool = vmmpp::elastic_pool<config>;
};

/// Builds pools and caches of a fault_case, and owns what they borrow: the fault plan, a budget
/// (twice the span; the model may take the whole span, so the quota never refuses), the buffer
/// an external backing carves up.
template <class Case>
struct rig {
    using upstream = typename Case::upstream;
    using quota_type = typename Case::config::quota_type;
    static constexpr bool has_budget = std::is_same_v<quota_type, vmmpp::shared_budget>;

    std::shared_ptr<vmmpp::fault_plan> plan = std::make_shared<vmmpp::fault_plan>();
    std::size_t byte_limit = SIZE_MAX;
    std::size_t page_bytes = page;  ///< the host or external backing's granularity
    std::unique_ptr<vmmpp::budget> budget;
    std::vector<std::byte> buffer;

    vmmpp::fault_injecting_options<upstream> backing_options(std::size_t span) {
        vmmpp::fault_injecting_options<upstream> o;
        o.byte_limit = byte_limit;
        o.plan = plan;
        o.upstream.page_bytes = page_bytes;
        if constexpr (is_external<upstream>) {
            buffer.assign(span, std::byte{0});
            o.upstream.pointer = buffer.data();
        }
        return o;
    }
    quota_type quota(std::size_t span) {
        if constexpr (has_budget) {
            budget = std::make_unique<vmmpp::budget>(2 * span);
            return budget->register_model("model", span);
        } else {
            return quota_type{};
        }
    }
    static std::size_t span_of(const vmmpp::kv_geometry& g) {
        return (Case::layout::span_bytes(g) + page - 1) / page * page;
    }

    std::unique_ptr<typename Case::pool> make_pool(std::size_t capacity) {
        return std::make_unique<typename Case::pool>(capacity, backing_options(capacity),
                                                     typename Case::config::growth_type{}, quota(capacity));
    }
    std::unique_ptr<typename Case::cache> make_cache(const vmmpp::kv_geometry& g) {
        const std::size_t span = span_of(g);
        return std::make_unique<typename Case::cache>(g, backing_options(span), typename Case::config::growth_type{},
                                                      quota(span));
    }
};

/// A budget's state, counters that only grow (peak, denied) apart.
struct budget_snapshot {
    std::size_t limit = 0, committed = 0;
    std::vector<std::tuple<std::string, std::size_t, std::size_t>> models;  // name, limit, committed
    explicit budget_snapshot(const vmmpp::budget& b) {
        const auto s = b.stats();
        limit = s.limit;
        committed = s.committed;
        for (const auto& m : s.models) {
            models.emplace_back(m.name, m.limit, m.committed);
        }
    }
    bool operator==(const budget_snapshot&) const = default;
};

/// Everything observable about a pool's memory.
struct pool_snapshot {
    std::size_t committed = 0, backing_committed = 0, held_pages = 0, idle_units = 0;
    std::vector<bool> units;
    template <class Pool>
    explicit pool_snapshot(const Pool& p)
        : committed(p.committed_bytes()), backing_committed(p.backing().committed_bytes()),
          held_pages(p.stats().held_pages), idle_units(p.stats().idle_units) {
        for (std::size_t u = 0; u < p.unit_count(); ++u) {
            units.push_back(p.is_unit_committed(u));
        }
    }
    bool operator==(const pool_snapshot&) const = default;
};

/// Everything observable about a cache but its bytes: sequences (tokens, block tables), block
/// reference counts, copy-on-write count, its pool, and its budget when it has one.
struct kv_snapshot {
    std::size_t used = 0, free = 0, seqs = 0;
    std::uint64_t cow = 0;
    std::map<vmmpp::seq_id, std::pair<std::size_t, std::vector<std::int32_t>>> tables;
    std::vector<std::uint32_t> refs;
    pool_snapshot pool;
    std::optional<budget_snapshot> budget;

    template <class Cache>
    kv_snapshot(const Cache& c, const vmmpp::budget* b)
        : used(c.used_blocks()), free(c.free_blocks()), seqs(c.sequence_count()), cow(c.cow_copies()),
          pool(c.pool()) {
        for (const auto& [id, s] : c.sequence_map()) {
            const auto t = c.block_table(id);
            tables[id] = {c.tokens(id), {t.begin(), t.end()}};
        }
        for (std::uint32_t blk = 0; blk < c.geometry().max_blocks; ++blk) {
            refs.push_back(c.block_refs(static_cast<std::int32_t>(blk)));
        }
        if (b != nullptr) {
            budget.emplace(*b);
        }
    }
    bool operator==(const kv_snapshot&) const = default;
};

/// The value written for token value `v` into tensor `tensor` (2 * layer + K/V).
constexpr std::uint16_t tensor_value(std::uint16_t v, std::uint32_t tensor) {
    return static_cast<std::uint16_t>(v + 7u * tensor);
}

/// Writes a token's value into every layer's K and V at its slot (the first 2 bytes of the
/// token's row: head 0, element 0).
template <class Cache>
void write_token(Cache& c, std::int64_t slot, std::uint16_t value) {
    const auto& g = c.geometry();
    const auto block = static_cast<std::int32_t>(slot / g.block_tokens);
    const auto offset =
        static_cast<std::size_t>(slot % g.block_tokens) * g.kv_heads * g.head_dim * vmmpp::size_of(g.type);
    for (std::uint32_t l = 0; l < g.layers; ++l) {
        for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
            const std::uint16_t v = tensor_value(value, 2 * l + static_cast<std::uint32_t>(part));
            std::memcpy(c.address(l, part, block) + offset, &v, 2);
        }
    }
}

/// Whether every layer's K and V at `slot` hold the value write_token wrote.
template <class Cache>
bool token_holds(const Cache& c, std::int64_t slot, std::uint16_t value) {
    const auto& g = c.geometry();
    const auto block = static_cast<std::int32_t>(slot / g.block_tokens);
    const auto offset =
        static_cast<std::size_t>(slot % g.block_tokens) * g.kv_heads * g.head_dim * vmmpp::size_of(g.type);
    for (std::uint32_t l = 0; l < g.layers; ++l) {
        for (auto part : {vmmpp::kv_part::key, vmmpp::kv_part::value}) {
            std::uint16_t v = 0;
            std::memcpy(&v, c.address(l, part, block) + offset, 2);
            if (v != tensor_value(value, 2 * l + static_cast<std::uint32_t>(part))) {
                return false;
            }
        }
    }
    return true;
}

} // namespace vmmpp_rel
