// vmmpp_mp_helper: a process that attaches to a process budget and commits through a real
// elastic_pool<host, page_granular, process_quota>, driven by test_process_budget line by line
// on stdin, answering on stdout (both ends of one socket).
//
//   vmmpp_mp_helper <segment> <model> <model_limit_bytes> <capacity_pages> [<spare_pages> [nowatch]]
//
// With <spare_pages>, released pages stay committed as spares up to that many (page_granular's
// spare_pages); with "nowatch" it attaches with process_budget_options::reclaim_watch off.
// It prints "ready <pid>", then answers each command (pages are vmmpp_mp::page bytes):
//   hold <first> <count>        one ensure_committed of pages [first, first+count):
//                               "ok <pool committed>" or "refused <requested> <in_use> <limit> <which>"
//   hold_pages <first> <count>  page by page, stopping at the first refusal:
//                               "held <n> ok" or "held <n> refused <requested> <in_use> <limit> <which>"
//   release <first> <count>     "ok <pool committed>"
//   committed                   "committed <pool committed> <this process's bytes of the model>"
//   hammer <threads> <iterations> <seed>
//                               each thread its own pool of the same model: random holds and
//                               releases, then it lets go of everything: "done <refusals> <bytes>"
//                               (bytes: what this process holds of the model afterwards)
//   die_holding_lock <bytes>    takes the segment's lock, adds bytes to the model's and the
//                               global totals but not to its record (half an update) and
//                               SIGKILLs itself
//   exec                        execs itself with the same arguments: the same process (pid and
//                               start time) in a new image, which attaches again and says "ready"
//   exit                        destroys the pool, which gives everything back: "bye", exit 0
// Any failure prints "error <what>" and exits 3.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "multiprocess/common.hpp"

namespace {

using vmmpp_mp::page;

std::string refusal(const vmmpp::over_quota& e) {
    return std::to_string(e.requested()) + " " + std::to_string(e.in_use()) + " " + std::to_string(e.limit()) + " " +
           e.which();
}

/// Random holds and releases on a pool of its own until `iterations`; returns the refusals.
std::size_t hammer_one(vmmpp::process_quota quota, std::size_t capacity_pages, std::size_t iterations,
                       std::uint64_t seed) {
    auto pool = vmmpp_mp::make_pool(capacity_pages, std::move(quota));
    std::mt19937_64 rng(seed);
    struct hold {
        std::size_t first, count;
    };
    std::vector<hold> holds;
    std::size_t refusals = 0;
    for (std::size_t i = 0; i < iterations; ++i) {
        if (holds.size() >= 4 || (!holds.empty() && rng() % 3 == 0)) {  // mostly holds, at most 4: churn
            const std::size_t k = rng() % holds.size();
            pool->release(holds[k].first * page, holds[k].count * page);
            holds[k] = holds.back();
            holds.pop_back();
            continue;
        }
        const std::size_t first = rng() % capacity_pages;
        const std::size_t count = std::min<std::size_t>(1 + rng() % 3, capacity_pages - first);
        try {
            pool->ensure_committed(first * page, count * page);
            holds.push_back({first, count});
        } catch (const vmmpp::over_quota&) {
            ++refusals;
        }
    }
    for (const auto& h : holds) {
        pool->release(h.first * page, h.count * page);
    }
    if (pool->committed_bytes() != 0) {
        throw std::runtime_error("a pool kept " + std::to_string(pool->committed_bytes()) + " bytes");
    }
    return refusals;
}

int run(int argc, char** argv) {
    if (argc < 5 || argc > 7 || (argc == 7 && std::string(argv[6]) != "nowatch")) {
        std::cout << "error usage: vmmpp_mp_helper <segment> <model> <model_limit_bytes> <capacity_pages> "
                     "[<spare_pages> [nowatch]]"
                  << std::endl;
        return 3;
    }
    const std::string model = argv[2];
    const std::size_t model_limit = std::stoull(argv[3]);
    const std::size_t capacity_pages = std::stoull(argv[4]);
    const std::size_t spare_pages = argc >= 6 ? std::stoull(argv[5]) : 0;
    vmmpp::process_budget_options options;
    options.reclaim_watch = argc != 7;
    auto budget = vmmpp::process_budget::open(argv[1], options);
    vmmpp::process_quota quota = budget.register_model(model, model_limit);
    auto pool = vmmpp_mp::make_pool(capacity_pages, quota, spare_pages);
    std::cout << "ready " << ::getpid() << std::endl;

    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string command;
        in >> command;
        if (command == "hold") {
            std::size_t first = 0, count = 0;
            in >> first >> count;
            try {
                pool->ensure_committed(first * page, count * page);
                std::cout << "ok " << pool->committed_bytes() << std::endl;
            } catch (const vmmpp::over_quota& e) {
                std::cout << "refused " << refusal(e) << std::endl;
            }
        } else if (command == "hold_pages") {
            std::size_t first = 0, count = 0;
            in >> first >> count;
            std::size_t held = 0;
            try {
                for (; held < count; ++held) {
                    pool->ensure_committed((first + held) * page, page);
                }
                std::cout << "held " << held << " ok" << std::endl;
            } catch (const vmmpp::over_quota& e) {
                std::cout << "held " << held << " refused " << refusal(e) << std::endl;
            }
        } else if (command == "release") {
            std::size_t first = 0, count = 0;
            in >> first >> count;
            pool->release(first * page, count * page);
            std::cout << "ok " << pool->committed_bytes() << std::endl;
        } else if (command == "committed") {
            std::cout << "committed " << pool->committed_bytes() << " " << quota.process_committed() << std::endl;
        } else if (command == "hammer") {
            std::size_t threads = 0, iterations = 0;
            std::uint64_t seed = 0;
            in >> threads >> iterations >> seed;
            std::atomic<std::size_t> refusals{0};
            std::vector<std::exception_ptr> errors(threads);
            std::vector<std::thread> workers;
            for (std::size_t t = 0; t < threads; ++t) {
                workers.emplace_back([&, t] {
                    try {
                        refusals += hammer_one(quota, capacity_pages, iterations, seed * 1000 + t);
                    } catch (...) {
                        errors[t] = std::current_exception();
                    }
                });
            }
            for (auto& w : workers) {
                w.join();
            }
            for (const auto& e : errors) {
                if (e) {
                    std::rethrow_exception(e);
                }
            }
            std::cout << "done " << refusals.load() << " " << quota.process_committed() - pool->committed_bytes()
                      << std::endl;
        } else if (command == "die_holding_lock") {
            std::uint64_t bytes = 0;
            in >> bytes;
            // A mapping of its own: the lock and the tables are the budget's.
            const auto segment = vmmpp_mp::attach_segment(budget.name());
            const auto share = vmmpp::detail::pb::register_share(segment, model, model_limit, segment->self());
            segment->mutex().lock();  // held until the process dies
            segment->models()[share.model()].committed += bytes;
            segment->head().committed += bytes;
            ::kill(::getpid(), SIGKILL);
            ::pause();
        } else if (command == "exec") {
            std::cout.flush();
            ::execv("/proc/self/exe", argv);
            throw std::runtime_error(std::string("execv: ") + std::strerror(errno));
        } else if (command == "exit") {
            pool.reset();
            std::cout << "bye" << std::endl;
            return 0;
        } else {
            std::cout << "error unknown command '" << line << "'" << std::endl;
            return 3;
        }
    }
    return 0;  // the test closed the socket
}

} // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::cout << "error " << e.what() << std::endl;
        return 3;
    }
}
