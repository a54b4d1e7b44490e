// Churn under a tight budget: kv caches with adaptive_extents, charged to one budget, random
// append / free / truncate, refusals included. Looks for the "granule ... is not committed" error.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include <unistd.h>
#include <sys/wait.h>
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/quota/process_budget.hpp"

template <class Quota>
int churn(Quota quota, unsigned seed, int steps) {
    using cfg = vmmpp::pool_config<vmmpp::host, GROWTH, Quota>;
    vmmpp::kv_geometry g{.layers = 8, .kv_heads = 8, .head_dim = 128, .type = vmmpp::dtype::bf16, .block_tokens = 16, .max_blocks = 2048};
    vmmpp::kv_cache<cfg, vmmpp::block_major> cache(g, {}, {}, std::move(quota));
    std::mt19937 rng(seed);
    std::vector<vmmpp::seq_id> seqs;
    int refused = 0;
    for (int i = 0; i < steps; ++i) {
        try {
            unsigned op = rng() % 10;
            if (op < 3 || seqs.empty()) {
                auto s = cache.add_sequence();
                try { cache.append(s, 16 + rng() % 1500); seqs.push_back(s); }
                catch (const vmmpp::over_quota&) { cache.free(s); ++refused; }
            } else if (op < 8) {
                auto s = seqs[rng() % seqs.size()];
                try { cache.append(s, 1 + rng() % 64); } catch (const vmmpp::over_quota&) { ++refused; }
            } else if (op == 8) {
                auto k = rng() % seqs.size(); cache.free(seqs[k]); seqs.erase(seqs.begin() + k);
            } else {
                auto s = seqs[rng() % seqs.size()]; cache.truncate(s, cache.tokens(s) / 2);
            }
        } catch (const std::exception& e) {
            std::printf("seed %u step %d (refused so far %d): %s\n", seed, i, refused, e.what());
            return 1;
        }
    }
    std::printf("seed %u: %d steps ok, %d refused\n", seed, steps, refused);
    return 0;
}

int main(int argc, char** argv) {
    const std::size_t limit = std::size_t{getenv("LIMIT_MIB") ? atoi(getenv("LIMIT_MIB")) : 64} << 20;
    if (argc > 1) {  // two processes, one process budget
        auto name = "vmmpp_h17_repro_" + std::to_string(getpid());
        vmmpp::process_budget::remove(name);
        auto b = vmmpp::process_budget::create(name, limit);
        pid_t child = fork();
        auto budget = vmmpp::process_budget::open(name);
        int rc = churn(budget.register_model(child == 0 ? "b" : "a", limit), child == 0 ? 7u : 3u, 20000);
        if (child == 0) _exit(rc);
        int status = 0; waitpid(child, &status, 0);
        vmmpp::process_budget::remove(name);
        return rc | WEXITSTATUS(status);
    }
    vmmpp::budget budget(limit);  // one process, shared_budget
    int rc = 0;
    for (unsigned seed = 1; seed <= 3; ++seed) rc |= churn(budget.register_model("m" + std::to_string(seed), limit), seed, 20000);
    return rc;
}
