// prefix_lending (vmmpp/prefix/lending.hpp) across processes: a forked child caches a prompt in
// a prefix cache on a process budget and goes idle (blocked reading a pipe: no call of its own);
// this process's growth past the global limit takes the child's cached pages through the child's
// watcher, about what it asked for, within the reclaim wait; the child's live blocks stay, and
// its prefix cache stays consistent.
#define BOOST_TEST_MODULE process lending
#include "support/cpu_main.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "vmmpp/backing/host.hpp"
#include "vmmpp/growth/page_granular.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/prefix/lending.hpp"
#include "vmmpp/prefix/prefix_cache.hpp"
#include "vmmpp/quota/process_budget.hpp"

namespace {

constexpr std::size_t page = std::size_t{2} << 20;  // the host backing's default page
// block_major, one block = 2 layers x K/V x 16 tokens x 64 heads x 64 dims x 2 bytes = 512 KiB.
constexpr vmmpp::kv_geometry g{.layers = 2, .kv_heads = 64, .head_dim = 64, .type = vmmpp::dtype::f16,
                               .block_tokens = 16, .max_blocks = 64};
constexpr std::size_t tokens_per_page = 4 * 16;

using cache_t = vmmpp::kv_cache<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::process_quota>>;
using prefix_t = vmmpp::prefix_cache<cache_t>;

std::string scratch() { return "vmmpp-lend-" + std::to_string(::getpid()); }

std::vector<std::int32_t> prompt(std::size_t n) {
    std::vector<std::int32_t> t(n);
    for (std::size_t i = 0; i < n; ++i) {
        t[i] = 500 + static_cast<std::int32_t>(i);
    }
    return t;
}

void write_line(int fd, const std::string& s) {
    const std::string line = s + "\n";
    (void)!::write(fd, line.data(), line.size());
}
std::string read_line(int fd) {
    std::string s;
    char c = 0;
    while (::read(fd, &c, 1) == 1 && c != '\n') {
        s += c;
    }
    return s;
}

/// The child: caches 4 pages of a prompt and holds 1 page live, says "ready", then waits for
/// the parent without a call; told "check N", it reports what its cache still holds.
[[noreturn]] void lender(const std::string& name, int to_parent, int from_parent) {
    int code = 0;
    try {
        vmmpp::process_budget_options o;
        o.reclaim_wait = std::chrono::seconds(10);
        auto budget = vmmpp::process_budget::open(name, o);  // this process's own watcher
        cache_t a(g, {}, {}, budget.register_model("a", 8 * page));
        prefix_t pa(a);
        vmmpp::prefix_lending<prefix_t> lending(pa);
        const auto tokens = prompt(4 * tokens_per_page);
        {
            const auto s = a.add_sequence();
            pa.append(s, tokens.size());
            const auto table = a.block_table(s);
            for (std::size_t i = 0; i < table.size(); ++i) {
                const std::uint64_t v = 0xA000 + i;
                std::memcpy(a.key(0, table[i]), &v, sizeof v);
            }
            pa.publish(s, tokens);
            pa.free(s);
        }
        const auto live = a.add_sequence();
        pa.append(live, tokens_per_page);
        const std::vector<std::int32_t> live_blocks(a.block_table(live).begin(), a.block_table(live).end());
        write_line(to_parent, "ready");
        for (std::string cmd = read_line(from_parent); cmd != "exit" && !cmd.empty(); cmd = read_line(from_parent)) {
            // report: cached tokens found, blocks whose stamp is wrong, lending's evictions, live intact
            std::string report;
            {
                // The lock is let go before the report is sent: the parent's next request must not find
                // this owner busy (a busy owner is skipped for another process's request).
                const auto guard = lending.lock();
                const auto found = pa.lookup(tokens);
                std::size_t bad = 0;
                if (found > 0) {
                    const auto s = pa.attach(tokens);
                    const auto table = a.block_table(s.seq);
                    for (std::size_t i = 0; i < table.size(); ++i) {
                        std::uint64_t v = 0;
                        std::memcpy(&v, a.key(0, table[i]), sizeof v);
                        bad += v != 0xA000 + i ? 1 : 0;
                    }
                    pa.free(s.seq);
                }
                const bool live_ok = a.tokens(live) == tokens_per_page &&
                                     std::vector<std::int32_t>(a.block_table(live).begin(), a.block_table(live).end()) == live_blocks;
                const auto st = lending.stats();
                report = std::to_string(found) + " " + std::to_string(bad) + " " + std::to_string(st.lent_blocks) + " " +
                         std::to_string(st.lent_bytes) + " " + (live_ok ? "live" : "broken");
            }
            write_line(to_parent, report);
        }
    } catch (const std::exception& e) {
        write_line(to_parent, std::string("error ") + e.what());
        code = 3;
    }
    ::_exit(code);
}

std::size_t usage_of(const vmmpp::process_budget_stats& s, pid_t pid) {
    std::size_t bytes = 0;
    for (const auto& u : s.usage) {
        bytes += u.process.pid == pid ? u.committed : 0;
    }
    return bytes;
}

} // namespace

BOOST_AUTO_TEST_CASE(an_idle_processs_cached_blocks_go_to_a_refused_process_never_its_live_ones) {
    const std::string name = scratch();
    vmmpp::process_budget_options o;
    o.reclaim_wait = std::chrono::seconds(10);
    o.reclaim_watch = false;  // this process only asks: no thread here before the fork
    auto budget = vmmpp::process_budget::create(name, 8 * page, o);
    int up[2], down[2];
    BOOST_REQUIRE(::pipe(up) == 0 && ::pipe(down) == 0);
    const pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
        ::close(up[0]);
        ::close(down[1]);
        lender(name, up[1], down[0]);
    }
    ::close(up[1]);
    ::close(down[0]);
    BOOST_REQUIRE_EQUAL(read_line(up[0]), "ready");
    BOOST_TEST(usage_of(budget.stats(), child) == 5 * page);

    {
        cache_t b(g, {}, {}, budget.register_model("b", 8 * page));
        const auto sb = b.add_sequence();
        b.append(sb, 3 * tokens_per_page);  // what was free
        const auto t0 = std::chrono::steady_clock::now();
        BOOST_CHECK_NO_THROW(b.append(sb, 2 * tokens_per_page));  // 2 of the child's cached pages
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        BOOST_TEST_MESSAGE("granted after " << ms << " ms");
        BOOST_TEST(ms < 5000.0);  // well inside the 10 s wait
        BOOST_TEST(usage_of(budget.stats(), child) == 3 * page);
        write_line(down[1], "check");
        // The tail went: 2 pages of the prompt are still cached and intact; 8 blocks lent.
        BOOST_TEST(read_line(up[0]) == std::to_string(2 * tokens_per_page) + " 0 8 " + std::to_string(2 * page) + " live");
        const auto s = budget.stats();
        BOOST_TEST(s.request_grants >= 1u);
        BOOST_TEST(s.request_reclaimed >= 2 * page);

        // 3 pages more: the child holds 3 (2 cached, 1 live). Its cache goes, its live page stays:
        // refused, with nothing charged to b.
        BOOST_CHECK_THROW(b.append(sb, 3 * tokens_per_page), vmmpp::over_quota);
        BOOST_TEST(usage_of(budget.stats(), child) == page);
        write_line(down[1], "check");
        BOOST_TEST(read_line(up[0]) == "0 0 16 " + std::to_string(4 * page) + " live");
        BOOST_TEST(b.tokens(sb) == 5 * tokens_per_page);
    }
    write_line(down[1], "exit");
    int status = 0;
    BOOST_TEST(::waitpid(child, &status, 0) == child);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0));
    BOOST_TEST(budget.remove());
}
