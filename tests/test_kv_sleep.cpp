// Sleep and wake of a kv_cache on the host backing (CI runs these for real): the live blocks go
// to a host buffer and every byte of the pool goes back, sequences and block tables stay; waking
// commits the same offsets and brings the data back. Calls made while asleep, sleeping twice,
// waking an awake cache, a buffer too small, a budget that refuses the wake, and a backing that
// fails in the middle of a wake (the cache must stay asleep and wake later with its data).
#define BOOST_TEST_MODULE kv_sleep
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "vmmpp/backing/fault_injecting.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"
#include "vmmpp/quota/shared_budget.hpp"
#include "vmmpp/stats.hpp"

namespace {

constexpr std::size_t page = std::size_t{64} << 10;
// 2 layers x K/V x 16 tokens x 2 heads x 32 x 2 bytes: 4 KiB per layer piece, 16 KiB blocks.
constexpr vmmpp::kv_geometry geometry{.layers = 2, .kv_heads = 2, .head_dim = 32, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 256};

template <class Config, class Layout>
struct sleep_case {
    using cache = vmmpp::kv_cache<Config, Layout>;
    static std::unique_ptr<cache> make() {
        return std::make_unique<cache>(geometry, vmmpp::host_options{.page_bytes = page}, typename Config::growth_type{},
                                       typename Config::quota_type{}, vmmpp::kv_cache_options{.span_alignment = page});
    }
};
using chunked_host = vmmpp::pool_config<vmmpp::host, vmmpp::chunked<2>, vmmpp::unlimited>;
using cases = boost::mpl::list<sleep_case<vmmpp::host_config, vmmpp::layer_major>,
                               sleep_case<vmmpp::host_config, vmmpp::block_major>,
                               sleep_case<vmmpp::host_config, vmmpp::packed_kv>,
                               sleep_case<chunked_host, vmmpp::layer_major_hnd>>;

/// Writes a pattern of (offset, salt) into every live block's pieces (Layout::for_each_piece:
/// exactly the bytes a block owns, whatever the layout), one byte in 64.
template <class Cache, class F>
void for_each_live_byte(const Cache& c, F&& f) {
    using layout = typename Cache::layout_type;
    for (const auto& [id, s] : c.sequence_map()) {
        for (std::int32_t b : s.blocks) {
            layout::for_each_piece(c.geometry(), static_cast<std::uint32_t>(b), [&](std::size_t off, std::size_t bytes) {
                for (std::size_t i = 0; i < bytes; i += 64) {
                    f(c.pool().base() + off + i, off + i);
                }
            });
        }
    }
}
std::byte pattern(std::size_t offset, std::uint8_t salt) {
    return std::byte(static_cast<std::uint8_t>(offset / 64 * 13 + offset / 4096 + salt));
}
template <class Cache>
void fill(Cache& c, std::uint8_t salt) {
    for_each_live_byte(c, [&](std::byte* p, std::size_t off) { *p = pattern(off, salt); });
}
/// Whether every live block holds fill(c, salt)'s pattern.
template <class Cache>
bool holds(const Cache& c, std::uint8_t salt) {
    bool same = true;
    for_each_live_byte(c, [&](const std::byte* p, std::size_t off) { same = same && *p == pattern(off, salt); });
    return same;
}

/// Three sequences, one forked (shared blocks), partial last blocks, a freed one in between (a
/// hole in the block ids).
template <class Cache>
std::vector<vmmpp::seq_id> populate(Cache& c) {
    std::vector<vmmpp::seq_id> seqs;
    seqs.push_back(c.add_sequence());
    (void)c.append(seqs[0], 70);
    const auto gone = c.add_sequence();
    (void)c.append(gone, 40);
    seqs.push_back(c.add_sequence());
    (void)c.append(seqs[1], 33);
    c.free(gone);
    seqs.push_back(c.fork(seqs[0]));
    return seqs;
}

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(sleep_gives_everything_back_and_wake_restores_the_same_blocks, Case, cases) {
    auto c = Case::make();
    const auto seqs = populate(*c);
    fill(*c, 1);
    std::vector<std::vector<std::int32_t>> tables;
    for (auto s : seqs) {
        tables.emplace_back(c->block_table(s).begin(), c->block_table(s).end());
    }
    const vmmpp::kv_tensor k0 = c->tensor(0, vmmpp::kv_part::key);
    const std::size_t committed = c->pool().committed_bytes();
    BOOST_TEST(committed > 0u);
    const std::size_t need = c->sleep_bytes();
    BOOST_TEST(need == c->used_blocks() * geometry.block_bytes());  // whole blocks, nothing else

    std::vector<std::byte> host(need);
    const vmmpp::sleep_result slept = c->sleep(host);
    BOOST_TEST(c->asleep());
    BOOST_TEST(slept.bytes_copied == need);
    BOOST_TEST(slept.blocks == c->used_blocks());
    BOOST_TEST(slept.pool_bytes == committed);
    BOOST_TEST(c->pool().committed_bytes() == 0u);
    BOOST_TEST(c->pool().stats().charged == 0u);
    // Sequences and tables stay; so do addresses and tensors (offsets in the reserved span).
    for (std::size_t i = 0; i < seqs.size(); ++i) {
        BOOST_TEST(c->contains(seqs[i]));
        BOOST_TEST(std::vector<std::int32_t>(c->block_table(seqs[i]).begin(), c->block_table(seqs[i]).end()) == tables[i]);
    }
    BOOST_TEST(c->tensor(0, vmmpp::kv_part::key).data == k0.data);

    const vmmpp::sleep_result woke = c->wake();
    BOOST_TEST(!c->asleep());
    BOOST_TEST(woke.bytes_copied == need);
    BOOST_TEST(woke.pool_bytes == committed);  // the same pages again
    BOOST_TEST(c->pool().committed_bytes() == committed);
    BOOST_TEST(holds(*c, 1));
    BOOST_TEST(c->tensor(0, vmmpp::kv_part::key).data == k0.data);

    // Awake again: it grows, copies on write, frees as before.
    (void)c->append(seqs[2], 5);  // the fork's shared partial block: copy on write
    (void)c->append(seqs[1], 100);
    c->free(seqs[0]);
    c->free(seqs[1]);
    c->free(seqs[2]);
    BOOST_TEST(c->pool().committed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(calls_while_asleep_are_refused_and_change_nothing, Case, cases) {
    auto c = Case::make();
    const auto seqs = populate(*c);
    fill(*c, 2);
    // Waking an awake cache does nothing; a buffer too small is refused before anything moves.
    const vmmpp::sleep_result none = c->wake();
    BOOST_TEST(none.blocks == 0u);
    const std::size_t committed = c->pool().committed_bytes();
    std::vector<std::byte> small(c->sleep_bytes() - 1);
    BOOST_CHECK_THROW((void)c->sleep(small), vmmpp::invalid_argument);
    BOOST_TEST(!c->asleep());
    BOOST_TEST(c->pool().committed_bytes() == committed);

    std::vector<std::byte> host(c->sleep_bytes());
    (void)c->sleep(host);
    const std::size_t tokens = c->tokens(seqs[0]);
    try {
        (void)c->append(seqs[0], 1);
        BOOST_ERROR("append while asleep");
    } catch (const vmmpp::cache_asleep& e) {
        BOOST_TEST(e.operation() == "append");
    }
    BOOST_CHECK_THROW(c->truncate(seqs[0], 1), vmmpp::cache_asleep);
    BOOST_CHECK_THROW(c->free(seqs[1]), vmmpp::cache_asleep);
    BOOST_CHECK_THROW((void)c->sleep(host), vmmpp::cache_asleep);  // sleeping twice
    BOOST_TEST(c->tokens(seqs[0]) == tokens);
    BOOST_TEST(c->contains(seqs[1]));
    BOOST_TEST(c->pool().committed_bytes() == 0u);
    // Reads stay valid: tables and slots.
    std::vector<std::int64_t> slots(3);
    c->slot_mapping(seqs[0], 0, slots);
    BOOST_TEST(slots[0] >= 0);
    // A fork needs no memory: allowed, and its blocks wake with the rest.
    const auto child = c->fork(seqs[1]);
    (void)c->wake();
    BOOST_TEST(holds(*c, 2));
    BOOST_TEST(c->block_table(child).size() == c->block_table(seqs[1]).size());
    // The snapshot says whether it sleeps.
    vmmpp::stats_snapshot snap{};
    snap.add_cache("c", *c);
    BOOST_TEST(!snap.pools[0].cache->asleep);
}

BOOST_AUTO_TEST_CASE(an_empty_cache_sleeps_and_wakes) {
    auto c = sleep_case<vmmpp::host_config, vmmpp::layer_major>::make();
    const auto s = c->add_sequence();
    BOOST_TEST(c->sleep_bytes() == 0u);
    const vmmpp::sleep_result r = c->sleep(std::span<std::byte>());
    BOOST_TEST(r.bytes_copied == 0u);
    BOOST_TEST(c->asleep());
    (void)c->wake();
    (void)c->append(s, 1);
    BOOST_TEST(c->pool().committed_bytes() > 0u);
}

// copy_blocks refuses a sleeping cache on either side: its blocks have no memory until wake().
BOOST_AUTO_TEST_CASE(copy_blocks_refuses_a_sleeping_cache) {
    auto a = sleep_case<vmmpp::host_config, vmmpp::layer_major>::make();
    auto b = sleep_case<vmmpp::host_config, vmmpp::layer_major>::make();
    const auto sa = a->add_sequence();
    (void)a->append(sa, geometry.block_tokens);
    const auto sb = b->add_sequence();
    (void)b->append(sb, geometry.block_tokens);
    const std::int32_t src = a->block_table(sa)[0], dst = b->block_table(sb)[0];
    std::vector<std::byte> host(a->sleep_bytes());
    (void)a->sleep(host);
    BOOST_CHECK_THROW(vmmpp::copy_blocks(*a, std::span(&src, 1), *b, std::span(&dst, 1)), vmmpp::cache_asleep);
    BOOST_CHECK_THROW(vmmpp::copy_blocks(*b, std::span(&dst, 1), *a, std::span(&src, 1)), vmmpp::cache_asleep);
    (void)a->wake();
    vmmpp::copy_blocks(*a, std::span(&src, 1), *b, std::span(&dst, 1));  // awake: copies
}

// A budget lowered while the cache slept refuses the wake: it stays asleep, charges nothing, and
// wakes once the limit is raised.
BOOST_AUTO_TEST_CASE(a_wake_the_budget_refuses_leaves_the_cache_asleep) {
    using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
    vmmpp::budget b(64 * page);
    vmmpp::kv_cache<config, vmmpp::layer_major> c(geometry, vmmpp::host_options{.page_bytes = page}, {},
                                                  b.register_model("m", 64 * page),
                                                  vmmpp::kv_cache_options{.span_alignment = page});
    const auto seqs = populate(c);
    fill(c, 3);
    const std::size_t charged = b.stats().committed;
    std::vector<std::byte> host(c.sleep_bytes());
    (void)c.sleep(host);
    BOOST_TEST(b.stats().committed == 0u);  // the model's whole share is free for others
    BOOST_TEST(b.set_model_limit("m", page).applied());
    BOOST_CHECK_THROW((void)c.wake(), vmmpp::over_quota);
    BOOST_TEST(c.asleep());
    BOOST_TEST(b.stats().committed == 0u);
    BOOST_TEST(c.pool().committed_bytes() == 0u);
    BOOST_TEST(b.set_model_limit("m", 64 * page).applied());
    (void)c.wake();
    BOOST_TEST(b.stats().committed == charged);
    BOOST_TEST(holds(c, 3));
    (void)seqs;
}

// The backing fails in the middle of a wake, at each of its commits in turn: every time the
// cache stays asleep with nothing committed, and the next wake brings the same data back.
BOOST_AUTO_TEST_CASE(a_backing_failure_in_the_middle_of_a_wake_leaves_the_cache_asleep) {
    using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::page_granular, vmmpp::unlimited>;
    auto plan = std::make_shared<vmmpp::fault_plan>();
    vmmpp::kv_cache<config, vmmpp::layer_major> c(
        geometry, vmmpp::fault_injecting_options<vmmpp::host>{.upstream = {.page_bytes = page}, .plan = plan}, {}, {},
        vmmpp::kv_cache_options{.span_alignment = page});
    const auto seqs = populate(c);
    fill(c, 4);
    const std::size_t committed = c.pool().committed_bytes();
    const std::size_t units = committed / page;
    BOOST_TEST(units >= 4u);
    std::vector<std::byte> host(c.sleep_bytes());
    (void)c.sleep(host);
    for (std::size_t n = 1; n <= units; ++n) {
        plan->fail_commit_in(n);
        BOOST_CHECK_THROW((void)c.wake(), vmmpp::out_of_memory);
        BOOST_TEST(c.asleep());
        BOOST_TEST(c.pool().committed_bytes() == 0u);
        BOOST_TEST(c.pool().stats().held_pages == 0u);
    }
    plan->disarm();
    (void)c.wake();
    BOOST_TEST(c.pool().committed_bytes() == committed);
    BOOST_TEST(holds(c, 4));
    // And a failure while memory goes back on sleep: the cache sleeps all the same.
    plan->fail_decommit_in(1);
    try {
        (void)c.sleep(host);
    } catch (const vmmpp::error&) {
        // the decommit that failed: counted by the pool, the unit stays a spare or retires
    }
    BOOST_TEST(c.asleep());
    plan->disarm();
    (void)c.pool().trim();
    (void)c.wake();
    BOOST_TEST(holds(c, 4));
    (void)seqs;
}
