// vmmpp_budget_worker: a process that serves a model through a process budget while
// test_budget_tool runs vmmpp-budget against the same segment. It attaches with a limit watcher
// (process_budget_options::limit_watch, 5 ms), so a limit lowered by another process takes its
// pool's spares back, and commits through elastic_pool<host, page_granular{spares}, process_quota>.
//
//   vmmpp_budget_worker <segment> <model> <model_limit_bytes> <capacity_pages> <spare_pages> [global_limit]
//
// With a global limit it creates the segment if there is none (create_or_open); without, it
// opens an existing one.
// It prints "ready <pid>", then answers each command (pages are vmmpp_mp::page bytes):
//   hold <first> <count>     "ok <pool charged>" or "refused <which>"
//   release <first> <count>  "ok <pool charged>" (released pages stay as spares up to spare_pages)
//   report                   reports the pool's spares to the budget: "spares <bytes>"
//   charged                  "charged <pool charged>"
//   exit                     destroys the pool, which gives everything back: "bye", exit 0
// Any failure prints "error <what>" and exits 3.
#include <unistd.h>

#include <exception>
#include <iostream>
#include <sstream>
#include <string>

#include "multiprocess/common.hpp"
#include "vmmpp/stats.hpp"

int main(int argc, char** argv) {
    using vmmpp_mp::page;
    try {
        if (argc != 6 && argc != 7) {
            std::cout << "error usage" << std::endl;
            return 3;
        }
        vmmpp::process_budget_options o;
        o.limit_watch = std::chrono::milliseconds(5);
        vmmpp::process_budget budget = argc == 7 ? vmmpp::process_budget::create_or_open(argv[1], std::stoull(argv[6]), o)
                                                 : vmmpp::process_budget::open(argv[1], o);
        auto pool = std::make_unique<vmmpp_mp::pool>(std::stoull(argv[4]) * page, vmmpp::host_options{.page_bytes = page},
                                                     vmmpp::page_granular{.spare_pages = std::stoull(argv[5])},
                                                     budget.register_model(argv[2], std::stoull(argv[3])));
        std::cout << "ready " << ::getpid() << std::endl;
        std::string line;
        while (std::getline(std::cin, line)) {
            std::istringstream in(line);
            std::string command;
            std::size_t first = 0, count = 0;
            in >> command >> first >> count;
            if (command == "hold") {
                try {
                    pool->ensure_committed(first * page, count * page);
                    std::cout << "ok " << pool->stats().charged << std::endl;
                } catch (const vmmpp::over_quota& e) {
                    std::cout << "refused " << e.which() << std::endl;
                }
            } else if (command == "release") {
                pool->release(first * page, count * page);
                std::cout << "ok " << pool->stats().charged << std::endl;
            } else if (command == "report") {
                std::cout << "spares " << vmmpp::report_spares(*pool) << std::endl;
            } else if (command == "charged") {
                std::cout << "charged " << pool->stats().charged << std::endl;
            } else if (command == "exit") {
                pool.reset();
                std::cout << "bye" << std::endl;
                return 0;
            } else {
                std::cout << "error unknown command " << command << std::endl;
                return 3;
            }
        }
        return 0;
    } catch (const std::exception& e) {
        std::cout << "error " << e.what() << std::endl;
        return 3;
    }
}
