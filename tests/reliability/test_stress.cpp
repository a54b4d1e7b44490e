// Randomized stress (issue 7): three models' kv_caches — different geometries, layouts, growth
// policies and page sizes — on one shared budget, driven by long random series of add / append /
// fork / truncate / free, with now and then a commit made to fail, and checked against a
// reference model (support/kv_reference.hpp) after every operation: block ids, reference counts,
// tokens and their values, committed memory exact for the growth policy, every refusal
// (out_of_blocks, over_quota, out_of_memory) predicted and leaving everything unchanged, and the
// budget equal to the sum of the pools and never above a limit.
//
//   VMMPP_STRESS_OPS   operations per test case (default 50000: a few seconds in a Debug build)
//   VMMPP_STRESS_SEED  the seed (default: random); every failure prints the seed that repeats it
#define BOOST_TEST_MODULE stress
#include "support/cpu_main.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "reliability/support/kv_reference.hpp"

using namespace vmmpp_rel;

namespace {

constexpr std::size_t KiB = 1024;

template <class Growth, class Layout>
using stress_cache =
    vmmpp::kv_cache<vmmpp::pool_config<vmmpp::fault_injecting<vmmpp::host>, Growth, vmmpp::shared_budget>, Layout>;

// Model "small": layer-major, page-granular on 64 KiB pages. 256-byte block tensors: a block
// touches 4 pages (2 layers x K/V), a page holds 256 blocks of one tensor. At most 384 blocks in
// 512 KiB: it runs out of blocks before its quota.
using small_cache = stress_cache<vmmpp::page_granular, vmmpp::layer_major>;
constexpr vmmpp::kv_geometry small_geometry{.layers = 2, .kv_heads = 1, .head_dim = 32, .type = vmmpp::dtype::f16,
                                            .block_tokens = 4, .max_blocks = 384};
// Model "wide": block-major, chunks of 2 pages of 4 KiB. 20 KiB blocks over 8 KiB units: a block
// shares a unit with the block below and commits two more in one hold, so a fault can strike a
// hold half done. At most 3.2 MiB.
using wide_cache = stress_cache<vmmpp::chunked<2>, vmmpp::block_major>;
constexpr vmmpp::kv_geometry wide_geometry{.layers = 5, .kv_heads = 1, .head_dim = 64, .type = vmmpp::dtype::f32,
                                           .block_tokens = 8, .max_blocks = 160};
// Model "deep": layer-major, chunks of 4 pages of 16 KiB. 4 KiB block tensors, 16 blocks a
// unit. At most 2 MiB.
using deep_cache = stress_cache<vmmpp::chunked<4>, vmmpp::layer_major>;
constexpr vmmpp::kv_geometry deep_geometry{.layers = 1, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::bf16,
                                           .block_tokens = 16, .max_blocks = 256};

// Limits that bite: "small" may take all it can use (it runs out of blocks first), the others
// less than theirs, and the global limit less than their sum.
constexpr std::size_t small_limit = 1024 * KiB, wide_limit = 1536 * KiB, deep_limit = 1024 * KiB;
constexpr std::size_t global_limit = 2304 * KiB;

std::uint64_t env_number(const char* name, std::uint64_t fallback) {
    const char* text = std::getenv(name);
    if (text == nullptr || *text == '\0') {
        return fallback;
    }
    char* end = nullptr;
    const std::uint64_t value = std::strtoull(text, &end, 10);
    if (*end != '\0') {
        throw std::invalid_argument(std::string(name) + "=" + text + " is not a number");
    }
    return value;
}

struct run_settings {
    std::uint64_t seed, ops;
    static run_settings from_environment() {
        run_settings s{env_number("VMMPP_STRESS_SEED", std::random_device{}()), env_number("VMMPP_STRESS_OPS", 50000)};
        std::printf("stress: seed %llu, %llu operations (VMMPP_STRESS_SEED=%llu repeats this run)\n",
                    static_cast<unsigned long long>(s.seed), static_cast<unsigned long long>(s.ops),
                    static_cast<unsigned long long>(s.seed));
        std::fflush(stdout);
        return s;
    }
};

/// The three models on one budget, each cache with its own fault plan and reference model.
struct fleet {
    vmmpp::budget budget{global_limit};
    std::shared_ptr<vmmpp::fault_plan> plans[3] = {std::make_shared<vmmpp::fault_plan>(),
                                                   std::make_shared<vmmpp::fault_plan>(),
                                                   std::make_shared<vmmpp::fault_plan>()};
    small_cache small;
    wide_cache wide;
    deep_cache deep;
    std::vector<std::unique_ptr<stress_model>> owned;
    std::vector<stress_model*> models;

    /// `predict_global`: the models run one at a time, so each knows the others' memory.
    explicit fleet(bool predict_global)
        : small(small_geometry, {.upstream = {.page_bytes = 64 * KiB}, .plan = plans[0]}, {},
                budget.register_model("small", small_limit)),
          wide(wide_geometry, {.upstream = {.page_bytes = 4 * KiB}, .plan = plans[1]}, {},
               budget.register_model("wide", wide_limit)),
          deep(deep_geometry, {.upstream = {.page_bytes = 16 * KiB}, .plan = plans[2]}, {},
               budget.register_model("deep", deep_limit)) {
        const global_view global{global_limit, predict_global ? &models : nullptr};
        owned.push_back(std::make_unique<kv_reference<small_cache>>("small", small, plans[0], small_limit, global));
        owned.push_back(std::make_unique<kv_reference<wide_cache>>("wide", wide, plans[1], wide_limit, global));
        owned.push_back(std::make_unique<kv_reference<deep_cache>>("deep", deep, plans[2], deep_limit, global));
        for (auto& m : owned) {
            models.push_back(m.get());
        }
    }

    /// The budget never above a limit; with `exact`, equal to the models' predictions (and so
    /// to the pools, which each model compares with its prediction).
    void check_budget(bool exact) const {
        const auto s = budget.stats();
        if (s.committed > s.limit || s.peak > s.limit) {
            throw check_failure("budget: committed " + std::to_string(s.committed) + ", peak " +
                                std::to_string(s.peak) + ", over the global limit " + std::to_string(s.limit));
        }
        std::size_t sum = 0;
        for (std::size_t i = 0; i < models.size(); ++i) {
            const auto& m = s.models[i];
            if (m.committed > m.limit || m.peak > m.limit) {
                throw check_failure("budget: model " + m.name + " over its limit");
            }
            if (exact && m.committed != models[i]->predicted_committed()) {
                throw check_failure("budget: model " + m.name + " has " + std::to_string(m.committed) +
                                    " bytes, model predicts " + std::to_string(models[i]->predicted_committed()));
            }
            sum += m.committed;
        }
        if (s.committed != sum) {
            throw check_failure("budget: committed " + std::to_string(s.committed) + " != the models' sum " +
                                std::to_string(sum));
        }
    }

    [[nodiscard]] std::string summary() const {
        std::ostringstream out;
        const auto s = budget.stats();
        out << "budget peak " << s.peak / KiB << " of " << s.limit / KiB << " KiB, " << s.denied << " denied";
        for (const stress_model* m : models) {
            const op_counts& c = m->counts();
            out << "\n  " << m->name() << ": " << c.ops << " ops (" << c.adds << " add, " << c.appends << " append, "
                << c.forks << " fork, " << c.truncates << " truncate, " << c.frees << " free, " << c.cow
                << " copy-on-write); refused: " << c.refused[static_cast<int>(outcome::out_of_blocks)]
                << " out_of_blocks, " << c.refused[static_cast<int>(outcome::over_model_quota)]
                << " over its quota, " << c.refused[static_cast<int>(outcome::over_global_quota)]
                << " over the global quota, " << c.refused[static_cast<int>(outcome::out_of_memory)]
                << " injected out_of_memory; peak " << c.peak_committed / KiB << " of " << m->limit() / KiB
                << " KiB, " << c.peak_blocks << " blocks";
        }
        return out.str();
    }
};

} // namespace

BOOST_AUTO_TEST_CASE(three_models_one_budget_against_a_reference) {
    const run_settings settings = run_settings::from_environment();
    const auto start = std::chrono::steady_clock::now();
    fleet f(true);
    std::mt19937_64 rng(settings.seed);
    std::uint64_t op = 0;
    try {
        for (; op < settings.ops; ++op) {
            f.models[rng() % f.models.size()]->step(rng);
            f.check_budget(true);
            if (op % 64 == 63) {
                for (const stress_model* m : f.models) {
                    m->check(op % 1024 == 1023);
                }
            }
        }
        for (const stress_model* m : f.models) {
            m->check(true);
        }
    } catch (const check_failure& e) {
        BOOST_FAIL("operation " << op << " (seed " << settings.seed << "; VMMPP_STRESS_SEED=" << settings.seed
                                << " repeats it): " << e.what());
    } catch (const std::exception& e) {
        BOOST_FAIL("operation " << op << " (seed " << settings.seed << "; VMMPP_STRESS_SEED=" << settings.seed
                                << " repeats it) threw: " << e.what());
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("one thread: %llu operations in %.1f s, seed %llu; %s\n", static_cast<unsigned long long>(op), seconds,
                static_cast<unsigned long long>(settings.seed), f.summary().c_str());
    std::uint64_t refused = 0, appends = 0;
    for (const stress_model* m : f.models) {
        appends += m->counts().appends;
        for (auto r : m->counts().refused) {
            refused += r;
        }
    }
    BOOST_TEST(appends > 0u);
    if (settings.ops >= 50000) {
        BOOST_TEST(refused > 0u);  // the limits bite: the refusal paths ran
    }
}

BOOST_AUTO_TEST_CASE(one_thread_per_model_one_budget) {
    // The same models, each on its own thread: the shared budget is the only shared state. Each
    // model is checked exactly (global refusals are accepted wherever they could come first);
    // the budget never goes above a limit, and equals the pools' sum when the threads are done.
    const run_settings settings = run_settings::from_environment();
    const auto start = std::chrono::steady_clock::now();
    fleet f(false);
    std::vector<std::string> failures(f.models.size());
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < f.models.size(); ++i) {
        threads.emplace_back([&, i] {
            std::mt19937_64 rng(settings.seed + 1 + i);
            stress_model& m = *f.models[i];
            std::uint64_t op = 0;
            try {
                for (; op < settings.ops / f.models.size(); ++op) {
                    m.step(rng);
                    if (op % 64 == 63) {
                        m.check(op % 1024 == 1023);
                        f.check_budget(false);
                    }
                }
                m.check(true);
            } catch (const std::exception& e) {
                failures[i] = "operation " + std::to_string(op) + " of " + m.name() + ": " + e.what();
            }
        });
    }
    for (auto& t : threads) {
        t.join();
    }
    for (const auto& failure : failures) {
        if (!failure.empty()) {
            BOOST_ERROR(failure << " (seed " << settings.seed << "; VMMPP_STRESS_SEED=" << settings.seed
                                << " repeats each thread's operations)");
        }
    }
    try {
        f.check_budget(true);
    } catch (const check_failure& e) {
        BOOST_ERROR(e.what() << " (seed " << settings.seed << ")");
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("three threads: %llu operations in %.1f s, seed %llu; %s\n",
                static_cast<unsigned long long>(settings.ops), seconds, static_cast<unsigned long long>(settings.seed),
                f.summary().c_str());
}
