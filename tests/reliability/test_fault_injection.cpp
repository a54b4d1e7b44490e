// Fault injection (issue 7): the fault_injecting backing adaptor itself, then every host
// configuration with a commit (and a decommit) made to fail at every position of a scripted
// series of pool and kv_cache operations. A refused commit must leave the object exactly as it
// was and usable; a failed decommit must leave the operation done, with the page kept as a spare
// that trim() gives back. Byte limits cap what a pool takes.
#define BOOST_TEST_MODULE fault injection
#include "support/cpu_main.hpp"

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "reliability/support/rigs.hpp"
#include "vmmpp/kv/layout_list.hpp"

using namespace vmmpp_rel;
using vmmpp_test::host_chunked_budget_config;
using vmmpp_test::host_external_config;

namespace {

constexpr std::size_t small_page = 64 * 1024;  // more pages, so more commits per script

template <class B>
concept has_device_ordinal = requires(const B& b) {
    { b.device_ordinal() } -> std::same_as<int>;
};

bool contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

} // namespace

// --- the adaptor ------------------------------------------------------------------------------

static_assert(vmmpp::backing<vmmpp::fault_injecting<vmmpp::host>>);
static_assert(vmmpp::fault_injecting<vmmpp::host>::is_elastic);
static_assert(!vmmpp::fault_injecting<vmmpp::external<vmmpp::host_accessible>>::is_elastic);
static_assert(vmmpp::has_property<vmmpp::fault_injecting<vmmpp::host>, vmmpp::host_accessible>);
static_assert(!vmmpp::has_property<vmmpp::fault_injecting<vmmpp::host>, vmmpp::device_accessible>);
static_assert(vmmpp::has_property<vmmpp::fault_injecting<vmmpp::vmm>, vmmpp::device_accessible>);
static_assert(!vmmpp::has_property<vmmpp::fault_injecting<vmmpp::vmm>, vmmpp::host_accessible>);
static_assert(vmmpp::has_property<vmmpp::fault_injecting<vmmpp::managed_prefetch<>>, vmmpp::host_accessible> &&
              vmmpp::has_property<vmmpp::fault_injecting<vmmpp::managed_prefetch<>>, vmmpp::device_accessible>);
static_assert(!has_device_ordinal<vmmpp::fault_injecting<vmmpp::host>>);
static_assert(has_device_ordinal<vmmpp::fault_injecting<vmmpp::vmm>>);
// Adaptors nest: a fault under zeroing, zeroing under a fault.
static_assert(vmmpp::backing<vmmpp::zeroing<vmmpp::fault_injecting<vmmpp::external<vmmpp::host_accessible>>>>);
static_assert(vmmpp::backing<vmmpp::fault_injecting<vmmpp::zeroing<vmmpp::vmm>>>);
// Policies over an adaptor are checked as over its upstream.
static_assert(sizeof(vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::device>, vmmpp::preallocated, vmmpp::unlimited>) > 0);

BOOST_AUTO_TEST_CASE(forwards_everything_and_counts_commits) {
    auto plan = std::make_shared<vmmpp::fault_plan>();
    vmmpp::fault_injecting<vmmpp::host> b(8 * page, {.upstream = {.page_bytes = page}, .plan = plan});
    BOOST_TEST(b.capacity() == 8 * page);
    BOOST_TEST(b.granularity() == page);
    BOOST_TEST(b.base() == b.upstream().base());
    BOOST_TEST(b.byte_limit() == SIZE_MAX);
    BOOST_TEST(b.plan() == plan);
    b.commit(2 * page, 2 * page);
    BOOST_TEST(b.committed_bytes() == 2 * page);
    BOOST_TEST(b.upstream().committed_bytes() == 2 * page);
    std::memset(b.base() + 2 * page, 0x5a, 2 * page);  // really committed: writable
    b.decommit(2 * page, page);
    BOOST_TEST(b.committed_bytes() == page);
    BOOST_TEST(plan->commits_seen() == 1u);
    BOOST_TEST(plan->decommits_seen() == 1u);
    BOOST_TEST(plan->faults_injected() == 0u);
    // The upstream's own checks still apply, and are counted as calls.
    BOOST_CHECK_THROW(b.commit(3 * page, page), vmmpp::invalid_argument);  // already committed
    BOOST_CHECK_THROW(b.decommit(0, page), vmmpp::invalid_argument);       // not committed
    BOOST_TEST(plan->commits_seen() == 2u);
    BOOST_TEST(b.committed_bytes() == page);
    // Without a plan nothing is counted and nothing fails.
    vmmpp::fault_injecting<vmmpp::host> plain(4 * page);
    plain.commit(0, 4 * page);
    BOOST_TEST(plain.committed_bytes() == 4 * page);
    BOOST_TEST(plain.plan() == nullptr);
}

BOOST_AUTO_TEST_CASE(a_planned_commit_failure_changes_nothing) {
    auto plan = std::make_shared<vmmpp::fault_plan>();
    vmmpp::fault_injecting<vmmpp::host> b(8 * page, {.plan = plan});
    b.commit(0, page);
    plan->fail_commit_in(2);
    BOOST_TEST(plan->commit_armed());
    b.commit(page, page);  // the 1st from now: passes
    try {
        b.commit(4 * page, 2 * page);  // the 2nd: fails; commit #3 of the plan
        BOOST_ERROR("the planned commit did not fail");
    } catch (const vmmpp::out_of_memory& e) {
        BOOST_TEST(contains(e.what(), "fault injection: commit #3"), e.what());
        BOOST_TEST(e.requested() == 2 * page);
        BOOST_TEST(e.committed() == 2 * page);
        BOOST_TEST(e.limit() == 2 * page);
    }
    BOOST_TEST(!plan->commit_armed());  // one shot
    BOOST_TEST(plan->faults_injected() == 1u);
    BOOST_TEST(plan->commits_seen() == 3u);
    BOOST_TEST(b.committed_bytes() == 2 * page);
    b.commit(4 * page, 2 * page);  // the same range now commits
    BOOST_TEST(b.committed_bytes() == 4 * page);
    b.base()[5 * page] = std::byte{1};
    // Re-arming replaces; 0 disarms; disarm() disarms.
    plan->fail_commit_in(1);
    plan->fail_commit_in(0);
    b.commit(6 * page, page);
    plan->fail_commit_in(1);
    plan->disarm();
    b.commit(7 * page, page);
    BOOST_TEST(plan->faults_injected() == 1u);
}

BOOST_AUTO_TEST_CASE(a_planned_decommit_failure_changes_nothing) {
    auto plan = std::make_shared<vmmpp::fault_plan>();
    vmmpp::fault_injecting<vmmpp::host> b(4 * page, {.plan = plan});
    b.commit(0, 2 * page);
    b.base()[page] = std::byte{9};
    plan->fail_decommit_in(1);
    BOOST_TEST(plan->decommit_armed());
    try {
        b.decommit(page, page);
        BOOST_ERROR("the planned decommit did not fail");
    } catch (const vmmpp::out_of_memory&) {
        BOOST_ERROR("a decommit failure is no out_of_memory");
    } catch (const vmmpp::error& e) {
        BOOST_TEST(contains(e.what(), "fault injection: decommit #1"), e.what());
    }
    BOOST_TEST(b.committed_bytes() == 2 * page);
    BOOST_TEST(static_cast<int>(b.base()[page]) == 9);  // still committed, still its bytes
    b.decommit(page, page);
    BOOST_TEST(b.committed_bytes() == page);
}

BOOST_AUTO_TEST_CASE(the_byte_limit_caps_committed_bytes) {
    vmmpp::fault_injecting<vmmpp::host> b(16 * page, {.byte_limit = 3 * page});
    b.commit(0, 2 * page);
    try {
        b.commit(4 * page, 2 * page);
        BOOST_ERROR("a commit past the byte limit succeeded");
    } catch (const vmmpp::out_of_memory& e) {
        BOOST_TEST(contains(e.what(), "byte limit"), e.what());
        BOOST_TEST(e.requested() == 2 * page);
        BOOST_TEST(e.committed() == 2 * page);
        BOOST_TEST(e.limit() == 3 * page);
    }
    BOOST_TEST(b.committed_bytes() == 2 * page);
    b.commit(4 * page, page);  // exactly up to the limit
    BOOST_TEST(b.committed_bytes() == 3 * page);
    BOOST_CHECK_THROW(b.commit(8 * page, page), vmmpp::out_of_memory);
    b.decommit(0, page);
    b.commit(8 * page, page);  // room again
    BOOST_TEST(b.committed_bytes() == 3 * page);
}

BOOST_AUTO_TEST_CASE(a_byte_limit_caps_a_pool_by_whole_units) {
    // chunked<2>: units of 2 pages. 5 pages allow two units; the third is refused whole, and the
    // failed hold changes nothing.
    using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::chunked<2>, vmmpp::unlimited>;
    vmmpp::elastic_pool<config> pool(16 * page, {.byte_limit = 5 * page});
    pool.ensure_committed(0, 3 * page);
    BOOST_TEST(pool.committed_bytes() == 4 * page);
    const pool_snapshot before(pool);
    BOOST_CHECK_THROW(pool.ensure_committed(3 * page, 2 * page), vmmpp::out_of_memory);  // needs unit 2
    BOOST_TEST((pool_snapshot(pool) == before));
    pool.ensure_committed(3 * page, page);  // inside unit 1: no commit
    pool.release(0, 3 * page);
    BOOST_TEST(pool.committed_bytes() == 2 * page);  // unit 1 is still held
    pool.ensure_committed(8 * page, 2 * page);        // room again
    BOOST_TEST(pool.committed_bytes() == 4 * page);
}

BOOST_AUTO_TEST_CASE(a_byte_limit_caps_a_kv_cache) {
    // block-major, 16 KiB blocks on 2 MiB pages: 128 blocks a page. A 2-page limit holds 256.
    using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::page_granular, vmmpp::unlimited>;
    constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 1024};
    vmmpp::kv_cache<config, vmmpp::block_major> c(g, {.byte_limit = 2 * page});
    const auto a = c.add_sequence();
    c.append(a, 256 * 16);
    BOOST_TEST(c.pool().committed_bytes() == 2 * page);
    const kv_snapshot before(c, nullptr);
    try {
        c.append(a, 1);
        BOOST_ERROR("a block past the byte limit was granted");
    } catch (const vmmpp::out_of_memory& e) {
        BOOST_TEST(contains(e.what(), "byte limit"), e.what());
        BOOST_TEST(e.limit() == 2 * page);
    }
    BOOST_TEST((kv_snapshot(c, nullptr) == before));
    BOOST_TEST(c.can_append(a, 1));  // blocks are free: only memory is short
    c.truncate(a, 128 * 16);         // the second page goes back
    BOOST_TEST(c.pool().committed_bytes() == page);
    const auto b = c.add_sequence();
    c.append(b, 128 * 16);
    BOOST_TEST(c.pool().committed_bytes() == 2 * page);
    BOOST_TEST(c.pool().backing().byte_limit() == 2 * page);
}

BOOST_AUTO_TEST_CASE(a_failed_up_front_commit_fails_the_pool_and_leaks_nothing) {
    // Preallocated pools commit their whole span in the constructor: a fault there is an
    // out_of_memory from the constructor, with the budget given back.
    using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::preallocated, vmmpp::shared_budget>;
    vmmpp::budget budget(16 * page);
    auto plan = std::make_shared<vmmpp::fault_plan>();
    plan->fail_commit_in(1);
    BOOST_CHECK_THROW(vmmpp::elastic_pool<config>(8 * page, {.plan = plan}, {}, budget.register_model("a", 8 * page)),
                      vmmpp::out_of_memory);
    BOOST_TEST(budget.stats().committed == 0u);
    BOOST_TEST(budget.stats().models.empty());  // and the registration ended with the failed pool
    // A byte limit below the span fails it the same way.
    BOOST_CHECK_THROW(
        vmmpp::elastic_pool<config>(8 * page, {.byte_limit = 4 * page}, {}, budget.register_model("b", 8 * page)),
        vmmpp::out_of_memory);
    BOOST_TEST(budget.stats().committed == 0u);
    vmmpp::elastic_pool<config> ok(8 * page, {.plan = plan}, {}, budget.register_model("c", 8 * page));
    BOOST_TEST(budget.stats().committed == 8 * page);
    BOOST_TEST(ok.committed_bytes() == 8 * page);

    // The same for a cache over an external buffer.
    using case_t = fault_case<host_external_config>;
    constexpr vmmpp::kv_geometry g{.layers = 1, .kv_heads = 1, .head_dim = 64, .type = vmmpp::dtype::f16,
                                   .block_tokens = 16, .max_blocks = 64};
    rig<case_t> r;
    r.plan->fail_commit_in(1);
    try {
        (void)r.make_cache(g);
        BOOST_ERROR("the cache was built although its only commit failed");
    } catch (const vmmpp::out_of_memory& e) {
        BOOST_TEST(contains(e.what(), "fault injection: commit #1"), e.what());
    }
    auto cache = r.make_cache(g);
    const auto s = cache->add_sequence();
    cache->append(s, 100);
    BOOST_TEST(r.plan->commits_seen() == 2u);  // the failed one and the one that built the pool
}

BOOST_AUTO_TEST_CASE(one_plan_shared_by_threads) {
    // Four pools on four threads share one plan, which a fifth thread re-arms all the time: every
    // call is counted once, every injected fault reaches exactly one caller. (TSan checks the
    // plan's locking in the tsan build.)
    using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::page_granular, vmmpp::unlimited>;
    auto plan = std::make_shared<vmmpp::fault_plan>();
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> calls{0}, failures{0};
    std::thread arming([&] {
        std::uint64_t n = 0;
        while (!stop.load()) {
            if (n % 2 == 0 || !plan->commit_armed()) {  // now and then replace an armed fault
                plan->fail_commit_in(1 + n % 5);
            }
            ++n;
            std::this_thread::yield();
        }
    });
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&] {
            vmmpp::elastic_pool<config> pool(16 * small_page, {.upstream = {.page_bytes = small_page}, .plan = plan});
            for (int i = 0; i < 2000; ++i) {
                const std::size_t p = static_cast<std::size_t>(i) % 16;
                ++calls;
                try {
                    pool.ensure_committed(p * small_page, 1);
                } catch (const vmmpp::out_of_memory&) {
                    ++failures;
                    if (pool.is_committed(p * small_page, 1) || pool.stats().held_pages != 0) {
                        throw std::logic_error("a failed hold left something behind");
                    }
                    continue;
                }
                pool.release(p * small_page, 1);
            }
        });
    }
    for (auto& th : threads) {
        th.join();
    }
    stop = true;
    arming.join();
    BOOST_TEST(plan->commits_seen() == calls.load());  // every hold of an uncommitted page commits once
    BOOST_TEST(plan->faults_injected() == failures.load());
    BOOST_TEST_MESSAGE(calls.load() << " commits, " << failures.load() << " injected failures");
}

// --- every position of a scripted run ---------------------------------------------------------

namespace {

enum class fault_kind { commit, decommit };

/// One scripted operation: `op` calls the library (and may throw); `after` updates the test's
/// own model once the call took effect.
template <class Run>
struct step {
    std::string name;
    std::function<void(Run&)> op;
    std::function<void(Run&)> after = [](Run&) {};
};

/// A pool of a case, and what the sweep asks of it.
template <class Case>
struct pool_run {
    rig<Case> r;
    std::unique_ptr<typename Case::pool> pool;
    explicit pool_run(std::size_t pages) {
        r.page_bytes = small_page;
        pool = r.make_pool(pages * small_page);
    }
    struct snap {
        pool_snapshot pool;
        std::optional<budget_snapshot> budget;
        bool operator==(const snap&) const = default;
    };
    [[nodiscard]] snap snapshot() const {
        return {pool_snapshot(*pool), r.budget ? std::optional<budget_snapshot>(*r.budget) : std::nullopt};
    }
    [[nodiscard]] std::string damage() const { return {}; }  // a pool keeps no values of ours
    /// `s` with its memory accounting replaced by `ref`'s: what a failed decommit may change.
    static snap memory_from(snap s, const snap& ref) {
        s.pool = ref.pool;
        s.budget = ref.budget;
        return s;
    }
    [[nodiscard]] std::size_t committed() const { return pool->committed_bytes(); }
    void trim() { (void)pool->trim(); }
    [[nodiscard]] std::pair<std::size_t, std::size_t> peaks() const {
        return {pool->stats().peak_committed, r.budget ? r.budget->stats().peak : 0};
    }
};

/// A cache of a case, the tokens' values written into it, and what the sweep asks of it.
template <class Case>
struct kv_run {
    rig<Case> r;
    std::unique_ptr<typename Case::cache> cache;
    std::vector<vmmpp::seq_id> ids;  // by creation order, so steps can name them
    std::map<vmmpp::seq_id, std::vector<std::uint16_t>> values;
    std::uint16_t next_value = 1;
    vmmpp::token_range last_range{};
    vmmpp::seq_id last_child = 0;

    explicit kv_run(const vmmpp::kv_geometry& g) {
        r.page_bytes = small_page;
        cache = r.make_cache(g);
    }
    using snap = kv_snapshot;
    [[nodiscard]] snap snapshot() const { return kv_snapshot(*cache, r.budget.get()); }
    static snap memory_from(snap s, const snap& ref) {
        s.pool = ref.pool;
        s.budget = ref.budget;
        return s;
    }
    /// "" when every live token still holds its value, else what is wrong.
    [[nodiscard]] std::string damage() const {
        for (const auto& [id, v] : values) {
            std::vector<std::int64_t> slots(v.size());
            cache->slot_mapping(id, 0, slots);
            for (std::size_t t = 0; t < v.size(); ++t) {
                if (!token_holds(*cache, slots[t], v[t])) {
                    return "token " + std::to_string(t) + " of sequence " + std::to_string(id) + " lost its value";
                }
            }
        }
        return {};
    }
    [[nodiscard]] std::size_t committed() const { return cache->pool().committed_bytes(); }
    void trim() { (void)cache->pool().trim(); }
    [[nodiscard]] std::pair<std::size_t, std::size_t> peaks() const {
        return {cache->pool().stats().peak_committed, r.budget ? r.budget->stats().peak : 0};
    }

    // Script building blocks: seq(i) is the i-th sequence created.
    static step<kv_run> add() {
        return {"add", [](kv_run& k) { k.last_child = k.cache->add_sequence(); },
                [](kv_run& k) {
                    k.ids.push_back(k.last_child);
                    k.values[k.last_child];
                }};
    }
    static step<kv_run> append(std::size_t i, std::size_t n) {
        return {"append(seq " + std::to_string(i) + ", " + std::to_string(n) + ")",
                [=](kv_run& k) { k.last_range = k.cache->append(k.ids[i], n); },
                [=](kv_run& k) {
                    std::vector<std::int64_t> slots(n);
                    k.cache->slot_mapping(k.ids[i], k.last_range.first, slots);
                    for (auto slot : slots) {
                        write_token(*k.cache, slot, k.next_value);
                        k.values[k.ids[i]].push_back(k.next_value++);
                    }
                }};
    }
    static step<kv_run> fork(std::size_t i) {
        return {"fork(seq " + std::to_string(i) + ")", [=](kv_run& k) { k.last_child = k.cache->fork(k.ids[i]); },
                [=](kv_run& k) {
                    k.ids.push_back(k.last_child);
                    k.values[k.last_child] = k.values[k.ids[i]];
                }};
    }
    static step<kv_run> truncate(std::size_t i, std::size_t n) {
        return {"truncate(seq " + std::to_string(i) + ", " + std::to_string(n) + ")",
                [=](kv_run& k) { k.cache->truncate(k.ids[i], n); }, [=](kv_run& k) { k.values[k.ids[i]].resize(n); }};
    }
    static step<kv_run> free(std::size_t i) {
        return {"free(seq " + std::to_string(i) + ")", [=](kv_run& k) { k.cache->free(k.ids[i]); },
                [=](kv_run& k) { k.values.erase(k.ids[i]); }};
    }
};

/// Runs `script` once without faults (the reference: the state after every step), then once for
/// each N = 1, 2, ... with the Nth commit (or decommit) from the first step on made to fail,
/// until N passes the number of calls the script makes.
///
/// Commit faults: the failing step throws out_of_memory, leaves the snapshot and every token's
/// value as before the step, and succeeds when tried again. Decommit faults: the failing step
/// throws vmmpp::error with its effect taken (all but memory as in the reference); trim() then
/// gives the page kept as a spare back and the state equals the reference. Either way every
/// later step succeeds, the state after each step equals the reference, and the peaks are the
/// reference's.
template <class Run, class Make>
void sweep(Make make, const std::vector<step<Run>>& script, fault_kind kind, bool expect_calls) {
    const char* kind_name = kind == fault_kind::commit ? "commit" : "decommit";
    auto calls = [&](const Run& run) {
        return kind == fault_kind::commit ? run.r.plan->commits_seen() : run.r.plan->decommits_seen();
    };
    std::vector<typename Run::snap> reference;
    std::uint64_t total = 0;
    std::pair<std::size_t, std::size_t> peaks;
    {
        auto run = make();
        const std::uint64_t first = calls(*run);
        for (const auto& s : script) {
            s.op(*run);
            s.after(*run);
            reference.push_back(run->snapshot());
            BOOST_REQUIRE_MESSAGE(run->damage().empty(), s.name << ": " << run->damage());
        }
        total = calls(*run) - first;
        peaks = run->peaks();
    }
    BOOST_TEST_MESSAGE(script.size() << " steps make " << total << " " << kind_name << " calls");
    if (expect_calls) {
        BOOST_TEST(total > 0u);
    } else {
        BOOST_TEST(total == 0u);
    }
    for (std::uint64_t n = 1; n <= total + 1; ++n) {
        auto run = make();
        kind == fault_kind::commit ? run->r.plan->fail_commit_in(n) : run->r.plan->fail_decommit_in(n);
        std::size_t failed = 0;
        for (std::size_t i = 0; i < script.size(); ++i) {
            const auto& s = script[i];
            const auto before = run->snapshot();
            const std::string where = std::string(kind_name) + " fault " + std::to_string(n) + ", " + s.name;
            if (kind == fault_kind::commit) {
                try {
                    s.op(*run);
                } catch (const vmmpp::out_of_memory& e) {
                    ++failed;
                    BOOST_TEST(contains(e.what(), "fault injection: commit #"), where << ": " << e.what());
                    BOOST_TEST((run->snapshot() == before), where << ": changed by a failed commit");
                    BOOST_TEST(run->damage().empty(), where << ": " << run->damage());
                    s.op(*run);  // usable: the same step now succeeds
                }
                s.after(*run);
            } else {
                try {
                    s.op(*run);
                    s.after(*run);
                } catch (const vmmpp::out_of_memory& e) {
                    BOOST_ERROR(where << ": " << e.what());
                    throw;
                } catch (const vmmpp::error& e) {
                    ++failed;
                    BOOST_TEST(contains(e.what(), "fault injection: decommit #"), where << ": " << e.what());
                    s.after(*run);  // the step took effect
                    BOOST_TEST((Run::memory_from(run->snapshot(), reference[i]) == reference[i]),
                               where << ": the step did not take effect");
                    BOOST_TEST(run->committed() >= reference[i].pool.committed, where);
                    run->trim();
                }
            }
            BOOST_TEST((run->snapshot() == reference[i]), where << ": differs from the run without faults");
            BOOST_TEST(run->damage().empty(), where << ": " << run->damage());
        }
        BOOST_TEST(failed == (n <= total ? 1u : 0u), kind_name << " fault " << n << ": " << failed << " failures");
        BOOST_TEST((run->peaks() == peaks), kind_name << " fault " << n << ": peaks differ");
    }
}

using fault_configs = vmmpp::type_list<vmmpp::host_config, host_chunked_budget_config, host_external_config>;
template <class Config>
struct as_pool_case {
    using type = fault_case<Config>;
};
using pool_cases = vmmpp::apply_t<vmmpp::transform_t<fault_configs, as_pool_case>, std::tuple>;

// Each configuration in the NHD layouts of vmmpp::kv_layouts (block_major, layer_major).
using kv_cases = vmmpp::apply_t<vmmpp::product_t<fault_configs, vmmpp::nhd_kv_layouts, fault_case>, std::tuple>;

/// Holds and releases of ranges over several pages and units, overlapping, straddling pages.
template <class Case>
std::vector<step<pool_run<Case>>> pool_script() {
    using run = pool_run<Case>;
    constexpr std::size_t p = small_page;
    auto hold = [](std::size_t off, std::size_t bytes) {
        return step<run>{"ensure_committed(" + std::to_string(off) + ", " + std::to_string(bytes) + ")",
                         [=](run& r) { r.pool->ensure_committed(off, bytes); }};
    };
    auto release = [](std::size_t off, std::size_t bytes) {
        return step<run>{"release(" + std::to_string(off) + ", " + std::to_string(bytes) + ")",
                         [=](run& r) { r.pool->release(off, bytes); }};
    };
    return {hold(0, 3 * p),           hold(2 * p + p / 2, 3 * p), hold(10 * p - 1, 2),   release(0, 3 * p),
            hold(5 * p, 6 * p),       release(2 * p + p / 2, 3 * p), hold(0, 20 * p),   release(10 * p - 1, 2),
            release(5 * p, 6 * p),    hold(23 * p, p),            hold(13 * p + 5, 7 * p), release(0, 20 * p),
            release(23 * p, p),       release(13 * p + 5, 7 * p)};
}

/// add, multi-block appends, fork, appends that copy a shared partial block, truncate into a
/// shared block, free: every kind of kv_cache step, several pages at a time.
template <class Case>
std::vector<step<kv_run<Case>>> kv_script() {
    using k = kv_run<Case>;
    return {k::add(),           k::append(0, 40),  k::add(),           k::append(1, 1),    k::append(0, 300),
            k::fork(0),         k::append(2, 5),   k::append(0, 30),   k::truncate(0, 20), k::append(0, 70),
            k::free(1),         k::fork(2),        k::append(3, 200),  k::truncate(2, 3),  k::append(2, 64),
            k::free(0),         k::append(3, 500), k::free(2),         k::truncate(3, 0),  k::append(3, 17),
            k::add(),           k::append(4, 33),  k::free(3),         k::free(4)};
}

// 2 layers, 2 heads, 64 dims, fp16, 16 tokens: 4 KiB per block and tensor, 16 KiB per block;
// on 64 KiB pages a layer-major block touches 4 pages, a block-major page holds 4 blocks.
constexpr vmmpp::kv_geometry sweep_geometry{.layers = 2, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                            .block_tokens = 16, .max_blocks = 256};

} // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(every_failed_commit_of_pool_operations_changes_nothing, Case, pool_cases) {
    sweep<pool_run<Case>>([] { return std::make_unique<pool_run<Case>>(24); }, pool_script<Case>(),
                          fault_kind::commit, Case::config::growth_type::is_elastic);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(every_failed_decommit_of_pool_operations_is_a_spare, Case, pool_cases) {
    sweep<pool_run<Case>>([] { return std::make_unique<pool_run<Case>>(24); }, pool_script<Case>(),
                          fault_kind::decommit, Case::config::growth_type::is_elastic);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(every_failed_commit_of_kv_operations_changes_nothing, Case, kv_cases) {
    sweep<kv_run<Case>>([] { return std::make_unique<kv_run<Case>>(sweep_geometry); }, kv_script<Case>(),
                        fault_kind::commit, Case::config::growth_type::is_elastic);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(every_failed_decommit_of_kv_operations_is_a_spare, Case, kv_cases) {
    sweep<kv_run<Case>>([] { return std::make_unique<kv_run<Case>>(sweep_geometry); }, kv_script<Case>(),
                        fault_kind::decommit, Case::config::growth_type::is_elastic);
}

// Issue 30: a batch of ranges held in one call (kv_cache's append of a prompt) that the backing
// or the quota refuses half-way leaves the pool as it was: the runs before the refusal,
// committed and held by the call, are released and decommitted again, and a hold from before
// keeps its count (released once, its page goes back; twice is refused).
BOOST_AUTO_TEST_CASE(a_batched_hold_refused_half_way_changes_nothing) {
    constexpr std::size_t q = page / 4;
    // Runs: page 0 (commit 1), page 1 (held before: no commit), page 3 (2), page 5 (3), page 7 (4).
    const std::vector<vmmpp::byte_range> pieces{{0, q},        {q, q},     {page + q, q}, {page + 2 * q, q},
                                                {3 * page, q}, {3 * page + q, q}, {5 * page, q}, {7 * page, q}};
    {
        using config = vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, vmmpp::page_granular, vmmpp::unlimited>;
        auto plan = std::make_shared<vmmpp::fault_plan>();
        vmmpp::elastic_pool<config> pool(16 * page, {.plan = plan});
        pool.ensure_committed(page, q);  // held before
        for (std::uint64_t n = 1; n <= 4; ++n) {
            const pool_snapshot before(pool);
            plan->fail_commit_in(n);
            BOOST_CHECK_THROW(pool.ensure_committed(pieces), vmmpp::out_of_memory);
            BOOST_TEST((pool_snapshot(pool) == before), "commit " << n << " refused");
        }
        pool.ensure_committed(pieces);
        BOOST_TEST(pool.stats().held_pages == 5u);
        pool.release(pieces, vmmpp::pool_fence{});
        BOOST_TEST(pool.stats().held_pages == 1u);
        pool.release(page, q);
        BOOST_TEST(pool.committed_bytes() == 0u);
        BOOST_CHECK_THROW(pool.release(page, q), vmmpp::invalid_argument);
    }
    {
        // The quota: room for three pages, the batch needs four more than page 1: page 5 is refused.
        using config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>;
        vmmpp::budget budget(3 * page);
        vmmpp::elastic_pool<config> pool(16 * page, {}, {}, budget.register_model("m", 3 * page));
        pool.ensure_committed(page, q);
        const pool_snapshot before(pool);
        BOOST_CHECK_THROW(pool.ensure_committed(pieces), vmmpp::over_quota);
        BOOST_TEST((pool_snapshot(pool) == before));
        BOOST_TEST(budget.stats().committed == page);
        pool.release(page, q);
        BOOST_TEST(pool.committed_bytes() == 0u);
        BOOST_TEST(budget.stats().committed == 0u);
    }
}
