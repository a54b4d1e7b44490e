// vmmpp-budget against a real shared-memory process budget with other processes running: two
// vmmpp_budget_worker processes serve models through it while the test runs the tool (list,
// list --json, watch, limit, remove) as a third process and checks its output and exit codes,
// and the workers' pools. Also the tool's size and duration parsing, and its errors.
#define BOOST_TEST_MODULE budget_tool
#include "support/cpu_main.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "multiprocess/child_process.hpp"
#include "multiprocess/common.hpp"
#include "vmmpp-budget/sizes.hpp"
#include "vmmpp/stats.hpp"

namespace {

using vmmpp_mp::page;

/// A segment name of this test process, removed when the test ends.
struct scratch_name {
    explicit scratch_name(const std::string& tag) : name("/vmmpp-tool-test-" + std::to_string(::getpid()) + "-" + tag) {
        ::shm_unlink(name.c_str());
    }
    ~scratch_name() { ::shm_unlink(name.c_str()); }
    std::string name;
};

struct tool_result {
    int status = -1;     // exit status
    std::string output;  // stdout and stderr together
};

/// Runs vmmpp-budget with `args` and waits for it.
tool_result run_tool(const std::vector<std::string>& args) {
    std::vector<std::string> all{VMMPP_BUDGET_TOOL};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) {
        argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
        throw std::runtime_error("pipe");
    }
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(fds[1], STDOUT_FILENO);
        ::dup2(fds[1], STDERR_FILENO);
        ::unsetenv("VMMPP_BUDGET");
        ::execv(argv[0], argv.data());
        ::_exit(127);
    }
    ::close(fds[1]);
    tool_result r;
    char chunk[4096];
    for (ssize_t n; (n = ::read(fds[0], chunk, sizeof chunk)) != 0;) {
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        r.output.append(chunk, static_cast<std::size_t>(n));
    }
    ::close(fds[0]);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    BOOST_TEST_MESSAGE("vmmpp-budget " << args.size() << " args -> " << r.status << "\n" << r.output);
    return r;
}

std::unique_ptr<vmmpp_mp::child_process> start_worker(const std::string& segment, const std::string& model,
                                                      std::size_t limit, std::size_t pages, std::size_t spares) {
    auto child = std::make_unique<vmmpp_mp::child_process>(
        std::vector<std::string>{VMMPP_BUDGET_WORKER, segment, model, std::to_string(limit), std::to_string(pages),
                                 std::to_string(spares)});
    const std::string ready = child->read_line();
    BOOST_REQUIRE_MESSAGE(ready.starts_with("ready "), ready);
    return child;
}

const vmmpp::model_stats& model(const vmmpp::budget_stats& s, const std::string& name) {
    for (const auto& m : s.models) {
        if (m.name == name) {
            return m;
        }
    }
    throw std::runtime_error("no model " + name);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

} // namespace

BOOST_AUTO_TEST_CASE(sizes_and_durations) {
    using vmmpp_budget::parse_size;
    BOOST_TEST(parse_size("24GiB").value() == 24ull << 30);
    BOOST_TEST(parse_size("512MiB").value() == 512ull << 20);
    BOOST_TEST(parse_size("512mib").value() == 512ull << 20);
    BOOST_TEST(parse_size("1.5GiB").value() == 3ull << 29);
    BOOST_TEST(parse_size("64K").value() == 64ull << 10);
    BOOST_TEST(parse_size("3GB").value() == 3000000000ull);
    BOOST_TEST(parse_size("1048576").value() == 1048576ull);
    BOOST_TEST(parse_size("7B").value() == 7ull);
    for (const char* bad : {"", "GiB", "-1GiB", "1.5", "1.2.3GiB", "12Q", "1 GiB", ".5GiB", "99999999999999999999",
                            "20000000TiB", "0.3B"}) {
        BOOST_TEST(!parse_size(bad).has_value(), bad);
    }
    BOOST_TEST(vmmpp_budget::format_size(24ull << 30) == "24.0 GiB");
    BOOST_TEST(vmmpp_budget::format_size(1536ull << 20) == "1.5 GiB");
    BOOST_TEST(vmmpp_budget::format_size(100) == "100 B");
    BOOST_TEST(vmmpp_budget::parse_duration("250ms").value().count() == 250);
    BOOST_TEST(vmmpp_budget::parse_duration("2s").value().count() == 2000);
    BOOST_TEST(vmmpp_budget::parse_duration("1.5").value().count() == 1500);
    BOOST_TEST(!vmmpp_budget::parse_duration("soon").has_value());
}

BOOST_AUTO_TEST_CASE(errors_have_their_own_exit_codes) {
    const scratch_name missing("missing");
    tool_result r = run_tool({"--segment", missing.name, "list"});
    BOOST_TEST(r.status == 3);
    BOOST_TEST(contains(r.output, "does not exist"));

    // Another program's object of the same kind: not a vmmpp budget.
    const scratch_name foreign("foreign");
    const int fd = ::shm_open(foreign.name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::ftruncate(fd, 1 << 16) == 0);
    void* p = ::mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    std::memset(p, 0x5a, 1 << 16);
    ::munmap(p, 1 << 16);
    ::close(fd);
    r = run_tool({"-s", foreign.name, "list"});
    BOOST_TEST(r.status == 4);
    BOOST_TEST(contains(r.output, "is not a vmmpp process budget"));

    const scratch_name seg("errors");
    auto b = vmmpp::process_budget::create(seg.name, 16 * page);
    r = run_tool({"-s", seg.name, "limit", "nobody", "1MiB"});
    BOOST_TEST(r.status == 5);
    BOOST_TEST(contains(r.output, "has no model 'nobody'"));
    r = run_tool({"-s", seg.name, "remove", "nobody"});
    BOOST_TEST(r.status == 5);
    r = run_tool({"-s", seg.name, "limit", "m", "12Q"});
    BOOST_TEST(r.status == 2);
    BOOST_TEST(contains(r.output, "'12Q' is not a size"));
    r = run_tool({"-s", seg.name, "limit", "--global", "0"});
    BOOST_TEST(r.status == 2);
    r = run_tool({"list"});  // no segment named
    BOOST_TEST(r.status == 2);
    r = run_tool({"-s", seg.name, "frobnicate"});
    BOOST_TEST(r.status == 2);
    BOOST_TEST(b.stats().limit == 16 * page);  // nothing changed
}

BOOST_AUTO_TEST_CASE(list_watch_limit_and_remove_with_workers_running) {
    const scratch_name seg("live");
    auto budget = vmmpp::process_budget::create(seg.name, 64 * page);
    auto a = start_worker(seg.name, "llama-8b", 16 * page, 32, /*spares=*/4);
    auto b = start_worker(seg.name, "qwen-1b", 8 * page, 32, 0);
    BOOST_TEST(a->ask("hold 0 4") == "ok " + std::to_string(4 * page));
    BOOST_TEST(a->ask("release 2 2") == "ok " + std::to_string(4 * page));  // 2 live, 2 spares
    BOOST_TEST(a->ask("report") == "spares " + std::to_string(2 * page));
    BOOST_TEST(b->ask("hold 0 3") == "ok " + std::to_string(3 * page));

    tool_result r = run_tool({"-s", seg.name, "list"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(contains(r.output, "budget " + seg.name + ": limit 4.0 MiB, committed 448.0 KiB"));
    BOOST_TEST(contains(r.output, "MODEL"));
    BOOST_TEST(contains(r.output, "llama-8b"));
    BOOST_TEST(contains(r.output, "1.0 MiB"));   // llama's limit
    BOOST_TEST(contains(r.output, "128.0 KiB"));  // its spares

    r = run_tool({"-s", seg.name, "list", "--json"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(r.output.starts_with("{\"unix_ms\":"));
    BOOST_TEST(contains(r.output, "\"budget\":{\"limit\":4194304,\"committed\":458752,\"over\":0,"));
    BOOST_TEST(contains(r.output, "{\"name\":\"llama-8b\",\"limit\":1048576,\"committed\":262144,\"over\":0,"
                                  "\"peak\":262144,\"denied\":0,\"reclaims\":0,\"reclaimed\":0,\"spares\":131072}"));
    BOOST_TEST(contains(r.output, "\"process_budget\":{\"name\":\"" + seg.name + "\""));
    BOOST_TEST(contains(r.output, "\"pid\":" + std::to_string(a->pid())));

    r = run_tool({"-s", seg.name, "watch", "--count", "3", "--interval", "20ms"});
    BOOST_TEST(r.status == 0);
    std::size_t frames = 0;
    for (std::size_t at = 0; (at = r.output.find("budget " + seg.name, at)) != std::string::npos; ++at) {
        ++frames;
    }
    BOOST_TEST(frames == 3u);

    // Lower llama below what it holds (2 live + 2 spare pages) to 3 pages: the worker's limit
    // watcher gives its spares back, and then it fits.
    r = run_tool({"-s", seg.name, "limit", "llama-8b", "192KiB", "--wait", "5s"});
    BOOST_TEST(r.status == 0);
    // The tool reports the first moment the model fits: after one spare or both (the worker's
    // watcher gives them back one decommit at a time; CI under load saw the first).
    BOOST_TEST((contains(r.output, "model 'llama-8b' limit 1.0 MiB -> 192.0 KiB: applied (committed 128.0 KiB)") ||
                contains(r.output, "model 'llama-8b' limit 1.0 MiB -> 192.0 KiB: applied (committed 192.0 KiB)")),
               r.output);
    const auto settled_by = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (a->ask("charged") != "charged " + std::to_string(2 * page) && std::chrono::steady_clock::now() < settled_by) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    BOOST_TEST(a->ask("charged") == "charged " + std::to_string(2 * page));
    const vmmpp::model_stats llama = model(budget.stats(), "llama-8b");
    BOOST_TEST(llama.reclaims == 1u);
    BOOST_TEST(llama.reclaimed == 2 * page);
    BOOST_TEST(llama.spares == 0u);  // the worker's reclaim reset its report

    // Below its live blocks: pending, and growth above the limit is refused.
    r = run_tool({"-s", seg.name, "limit", "llama-8b", "65536", "--wait", "100ms"});
    BOOST_TEST(r.status == 7);
    BOOST_TEST(contains(r.output, "pending: 64.0 KiB (65536 bytes) over"));
    BOOST_TEST(a->ask("hold 4 1") == "refused model llama-8b");
    r = run_tool({"-s", seg.name, "limit", "llama-8b", "65536"});  // without --wait: pending is not an error
    BOOST_TEST(r.status == 0);
    r = run_tool({"-s", seg.name, "list"});
    BOOST_TEST(contains(r.output, "over by 64.0 KiB"));

    // Raising takes effect at once.
    r = run_tool({"-s", seg.name, "limit", "llama-8b", "1MiB"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(a->ask("hold 4 1") == "ok " + std::to_string(3 * page));

    // The global limit.
    r = run_tool({"-s", seg.name, "limit", "--global", "320KiB", "--wait", "2s"});
    BOOST_TEST(r.status == 7);  // 6 pages live: over by 1 page
    BOOST_TEST(contains(r.output, "global limit 4.0 MiB -> 320.0 KiB: pending: 64.0 KiB"));
    BOOST_TEST(b->ask("hold 3 1") == "refused global");
    BOOST_TEST(b->ask("release 0 1") == "ok " + std::to_string(2 * page));
    r = run_tool({"-s", seg.name, "limit", "--global", "320KiB", "--wait", "2s"});
    BOOST_TEST(r.status == 0);
    BOOST_TEST(budget.limit() == 5 * page);

    // A model in use is not removed; once its process is gone, it is.
    r = run_tool({"-s", seg.name, "remove", "qwen-1b"});
    BOOST_TEST(r.status == 6);
    BOOST_TEST(contains(r.output, std::to_string(b->pid())));
    BOOST_TEST(b->ask("exit") == "bye");
    b.reset();
    r = run_tool({"-s", seg.name, "remove", "qwen-1b"});
    BOOST_TEST(r.status == 0);
    r = run_tool({"-s", seg.name, "list"});
    BOOST_TEST(!contains(r.output, "qwen-1b"));
    BOOST_TEST(contains(r.output, "llama-8b"));
    BOOST_TEST(a->ask("exit") == "bye");
}

// The library calls behind the tool, in one process: set_model_limit / set_limit reclaim this
// process's pools at once; another handle's honour_limits acts on a lowering made elsewhere;
// joining after a change states the registered limit; remove_model; limit_status.
BOOST_AUTO_TEST_CASE(process_budget_limits_change_at_run_time) {
    const scratch_name seg("api");
    // No watcher: this test calls honour_limits itself (a watcher woken by an earlier lowering
    // could honour the later one first; test_process_budget tests the watcher).
    auto budget = vmmpp::process_budget::create(seg.name, 64 * page, {.reclaim_watch = false});
    auto pool = std::make_unique<vmmpp_mp::pool>(32 * page, vmmpp::host_options{.page_bytes = page},
                                                 vmmpp::page_granular{.spare_pages = 8},
                                                 budget.register_model("m", 16 * page));
    pool->ensure_committed(0, 6 * page);
    pool->release(2 * page, 4 * page);  // 2 live, 4 spares
    BOOST_TEST(vmmpp::report_spares(*pool) == 4 * page);

    vmmpp::limit_change c = budget.set_model_limit("m", page);
    BOOST_TEST(!c.applied());
    BOOST_TEST(c.reclaimed == 4 * page);
    BOOST_TEST(c.bytes_over == page);
    BOOST_TEST(pool->stats().committed == 2 * page);
    BOOST_CHECK_THROW(pool->ensure_committed(2 * page, page), vmmpp::over_quota);
    BOOST_TEST(budget.limit_status("m").bytes_over == page);
    BOOST_CHECK_THROW((void)budget.limit_status("nobody"), vmmpp::unknown_model);
    BOOST_CHECK_THROW((void)budget.set_model_limit("nobody", page), vmmpp::unknown_model);
    BOOST_CHECK_THROW((void)budget.set_model_limit("m", 0), vmmpp::invalid_argument);

    // Joining states the registered limit, not the one in force.
    BOOST_CHECK_THROW((void)budget.register_model("m", page), vmmpp::invalid_argument);
    vmmpp::process_quota again = budget.register_model("m", 16 * page);
    BOOST_TEST(again.stats().limit == page);

    // A lowering seen through honour_limits: the spares come back once, then nothing to do.
    BOOST_TEST(budget.set_model_limit("m", 16 * page).applied());
    pool->ensure_committed(2 * page, 3 * page);
    pool->release(2 * page, 3 * page);  // 3 spares
    {
        // Another process's view: lower through the detail layer without reclaiming here.
        auto other = vmmpp_mp::attach_segment(seg.name);
        std::lock_guard lock(other->mutex());
        vmmpp::detail::pb::model_slot& m = other->models()[0];
        m.limit = 3 * page;
        ++m.generation;
    }
    BOOST_TEST(budget.honour_limits() == 3 * page);
    BOOST_TEST(budget.honour_limits() == 0u);
    BOOST_TEST(budget.limit_status("m").applied());

    // The global limit.
    c = budget.set_limit(page);
    BOOST_TEST(c.bytes_over == page);
    BOOST_TEST(budget.limit() == page);
    BOOST_TEST(budget.set_limit(64 * page).applied());

    // remove_model: refused while this process holds a record of it.
    BOOST_CHECK_THROW((void)budget.remove_model("m"), vmmpp::model_in_use);
    pool.reset();
    BOOST_CHECK_THROW((void)budget.remove_model("m"), vmmpp::model_in_use);  // `again` still holds one
    BOOST_TEST(budget.stats().models.size() == 1u);
    BOOST_TEST(!budget.remove_model("nobody"));
}

// Threads of one process commit through pools of two models while another thread lowers and
// raises the limits: the totals stay the sum of the records, and nothing but over_quota is seen.
BOOST_AUTO_TEST_CASE(process_budget_limits_change_under_concurrent_commits) {
    const scratch_name seg("threads");
    vmmpp::process_budget_options o;
    o.limit_watch = std::chrono::milliseconds(1);
    auto budget = vmmpp::process_budget::create(seg.name, 128 * page, o);
    std::atomic<bool> stop{false};
    std::atomic<bool> foreign{false};
    std::atomic<std::size_t> refusals{0};
    std::atomic<int> registered{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
            try {
                auto pool = std::make_unique<vmmpp_mp::pool>(
                    64 * page, vmmpp::host_options{.page_bytes = page}, vmmpp::page_granular{.spare_pages = 4},
                    budget.register_model(t % 2 ? "odd" : "even", 64 * page));
                ++registered;
                std::mt19937_64 rng(static_cast<std::uint64_t>(t));
                while (!stop) {
                    const std::size_t first = rng() % 60;
                    const std::size_t count = 1 + rng() % 4;
                    try {
                        pool->ensure_committed(first * page, count * page);
                        pool->release(first * page, count * page);
                    } catch (const vmmpp::over_quota&) {
                        ++refusals;
                    }
                    (void)vmmpp::report_spares(*pool);
                }
            } catch (...) {
                foreign = true;
            }
        });
    }
    // Both models registered before their limits change (set_model_limit of a name not yet
    // registered throws unknown_model: under ASan on a loaded machine the threads came late).
    while (registered < 4 && !foreign) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    std::mt19937_64 rng(7);
    for (int i = 0; i < 200; ++i) {
        const std::size_t limit = (1 + rng() % 8) * page;
        const vmmpp::limit_change c = rng() % 3 ? budget.set_model_limit(rng() % 2 ? "odd" : "even", limit)
                                                : budget.set_limit(limit + 2 * page);
        BOOST_TEST((c.applied() == (c.bytes_over == 0)));
        std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
    stop = true;
    for (auto& t : threads) {
        t.join();
    }
    BOOST_TEST(!foreign.load());
    BOOST_TEST(refusals.load() > 0u);
    const vmmpp::process_budget_stats s = budget.stats();
    BOOST_TEST(s.committed == 0u);  // every pool gave everything back
    for (const auto& m : s.models) {
        BOOST_TEST(m.committed == 0u);
    }
    // How many reclaims the watcher made depends on the threads' timing (none under a slow
    // sanitizer run is possible): counted exactly in the single-threaded cases above.
}
