// vmmpp-budget: look at and change a cross-process vmmpp budget (vmmpp::process_budget) while the
// processes using it run.
//
//   vmmpp-budget [-s|--segment NAME] list [--json]
//   vmmpp-budget [-s|--segment NAME] watch [--interval DURATION] [--count N]
//   vmmpp-budget [-s|--segment NAME] limit MODEL SIZE [--wait DURATION]
//   vmmpp-budget [-s|--segment NAME] limit --global SIZE [--wait DURATION]
//   vmmpp-budget [-s|--segment NAME] remove MODEL
//
// The segment comes from --segment or the environment variable VMMPP_BUDGET. Exit codes: see
// `exit_code` below (and `vmmpp-budget --help`).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "sizes.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/process_budget.hpp"
#include "vmmpp/stats.hpp"

namespace {

/// What the tool's exit status means.
enum exit_code : int {
    ok = 0,
    failed = 1,            ///< any other error (the message says what)
    usage = 2,             ///< a bad command line, size or duration
    missing_segment = 3,   ///< no segment of that name
    foreign_segment = 4,   ///< not a vmmpp budget of this version / ABI, or owned by another user
    unknown_model = 5,     ///< no model of that name
    model_in_use = 6,      ///< remove: live processes still hold a share of it
    still_pending = 7,     ///< limit --wait: still over the new limit when the wait ended
};

constexpr const char* help_text =
    "usage: vmmpp-budget [-s|--segment NAME] COMMAND ...\n"
    "  list [--json]                       the budget and every model, once\n"
    "  watch [--interval 1s] [--count N]   the same, refreshed in place (Ctrl-C stops)\n"
    "  limit MODEL SIZE [--wait 5s]        set a model's limit now (24GiB, 512MiB, 1048576)\n"
    "  limit --global SIZE [--wait 5s]     set the global limit\n"
    "  remove MODEL                        remove a model no live process uses\n"
    "The segment is NAME or $VMMPP_BUDGET. Lowering a limit takes spares back at once and refuses\n"
    "growth above it; live blocks stay, and the model stays over until they fit ('pending').\n"
    "Exit status: 0 ok, 1 error, 2 usage or bad size, 3 no such segment, 4 foreign or\n"
    "incompatible segment, 5 unknown model, 6 model in use, 7 still over the limit after --wait.\n";

struct usage_error {
    std::string what;
};

std::uint64_t size_arg(std::string_view text) {
    if (auto bytes = vmmpp_budget::parse_size(text); bytes && *bytes > 0) {
        return *bytes;
    }
    throw usage_error{"'" + std::string(text) +
                      "' is not a size (a positive number of bytes, or with a unit: 512MiB, 24GiB, 3GB)"};
}

std::chrono::milliseconds duration_arg(std::string_view text) {
    if (auto d = vmmpp_budget::parse_duration(text)) {
        return *d;
    }
    throw usage_error{"'" + std::string(text) + "' is not a duration (250ms, 2s, 1m)"};
}

vmmpp::process_budget attach(const std::string& segment) {
    vmmpp::process_budget_options o;
    o.attach_timeout = std::chrono::milliseconds(200);  // a segment still being made is there by then
    return vmmpp::process_budget::open(segment, o);
}

vmmpp::stats_snapshot snapshot(const vmmpp::process_budget& b) {
    vmmpp::stats_snapshot s{};
    s.set_process_budget(b.name(), b.stats());
    return s;
}

std::string pad(std::string text, std::size_t width, bool left = false) {
    if (text.size() < width) {
        text = left ? text + std::string(width - text.size(), ' ') : std::string(width - text.size(), ' ') + text;
    }
    return text;
}

/// The table list and watch print.
std::string table(const vmmpp::stats_snapshot& s) {
    const vmmpp::budget_stats& b = *s.budget;
    std::map<std::string, std::size_t> processes;
    for (const auto& u : s.process_budget->usage) {
        ++processes[u.model];
    }
    std::string out = "budget " + s.process_budget->name + ": limit " + vmmpp_budget::format_size(b.limit) +
                      ", committed " + vmmpp_budget::format_size(b.committed) + ", peak " +
                      vmmpp_budget::format_size(b.peak) + ", denied " + std::to_string(b.denied) +
                      (b.over() > 0 ? ", OVER by " + vmmpp_budget::format_size(b.over()) : std::string()) + "\n";
    std::size_t name_width = 5;
    for (const auto& m : b.models) {
        name_width = std::max(name_width, m.name.size());
    }
    out += pad("MODEL", name_width, true) + pad("LIMIT", 12) + pad("COMMITTED", 12) + pad("PEAK", 12) +
           pad("DENIED", 8) + pad("RECLAIMS", 10) + pad("SPARES", 12) + pad("PROCS", 7) + "  STATE\n";
    for (const auto& m : b.models) {
        out += pad(m.name, name_width, true) + pad(vmmpp_budget::format_size(m.limit), 12) +
               pad(vmmpp_budget::format_size(m.committed), 12) + pad(vmmpp_budget::format_size(m.peak), 12) +
               pad(std::to_string(m.denied), 8) + pad(std::to_string(m.reclaims), 10) +
               pad(vmmpp_budget::format_size(m.spares), 12) + pad(std::to_string(processes[m.name]), 7) + "  " +
               (m.over() > 0 ? "over by " + vmmpp_budget::format_size(m.over()) : std::string("ok")) + "\n";
    }
    if (b.models.empty()) {
        out += "(no models)\n";
    }
    return out;
}

int list(const std::string& segment, bool json) {
    const vmmpp::process_budget b = attach(segment);
    const vmmpp::stats_snapshot s = snapshot(b);
    std::cout << (json ? vmmpp::to_json(s) + "\n" : table(s)) << std::flush;
    return ok;
}

int watch(const std::string& segment, std::chrono::milliseconds interval, std::optional<long> count) {
    const vmmpp::process_budget b = attach(segment);
    const bool tty = ::isatty(STDOUT_FILENO) != 0;
    for (long frame = 0; !count || frame < *count; ++frame) {
        if (frame > 0) {
            std::this_thread::sleep_for(interval);
        }
        const std::string text = table(snapshot(b));
        if (tty) {
            std::cout << "\x1b[H\x1b[2J";  // home, clear: the frame replaces the last one
        } else if (frame > 0) {
            std::cout << "\n";
        }
        std::cout << text << std::flush;
    }
    return ok;
}

int limit(const std::string& segment, const std::optional<std::string>& model, std::uint64_t bytes,
          std::optional<std::chrono::milliseconds> wait) {
    vmmpp::process_budget b = attach(segment);
    vmmpp::limit_change c = model ? b.set_model_limit(*model, bytes) : b.set_limit(bytes);
    const std::string who = model ? "model '" + *model + "'" : std::string("global");
    std::cout << who << " limit " << vmmpp_budget::format_size(c.previous) << " -> "
              << vmmpp_budget::format_size(c.limit) << ": ";
    if (!c.applied() && wait) {
        // Other processes give their spares back through their limit watcher or honour_limits;
        // their live blocks go as their sequences end.
        const auto deadline = std::chrono::steady_clock::now() + *wait;
        while (!c.applied() && std::chrono::steady_clock::now() < deadline) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
            c = b.limit_status(model ? std::string_view(*model) : std::string_view());
        }
    }
    if (c.applied()) {
        std::cout << "applied (committed " << vmmpp_budget::format_size(c.committed) << ")\n";
        return ok;
    }
    std::cout << "pending: " << vmmpp_budget::format_size(c.bytes_over) << " (" << c.bytes_over
              << " bytes) over until live blocks fit; growth above the limit is refused\n";
    return wait ? still_pending : ok;
}

int remove(const std::string& segment, const std::string& model) {
    vmmpp::process_budget b = attach(segment);
    if (!b.remove_model(model)) {
        throw vmmpp::unknown_model("process budget '" + b.name() + "' has no model '" + model + "'");
    }
    std::cout << "removed model '" << model << "'\n";
    return ok;
}

int run(std::vector<std::string> args) {
    std::string segment;
    if (const char* env = std::getenv("VMMPP_BUDGET")) {
        segment = env;
    }
    std::vector<std::string> rest;
    for (std::size_t i = 0; i < args.size(); ++i) {
        if (args[i] == "-h" || args[i] == "--help" || args[i] == "help") {
            std::cout << help_text;
            return ok;
        }
        if ((args[i] == "-s" || args[i] == "--segment") && i + 1 < args.size()) {
            segment = args[++i];
        } else if (args[i].starts_with("--segment=")) {
            segment = args[i].substr(10);
        } else {
            rest.push_back(args[i]);
        }
    }
    if (rest.empty()) {
        throw usage_error{"no command"};
    }
    if (segment.empty()) {
        throw usage_error{"no segment: pass --segment NAME or set VMMPP_BUDGET"};
    }
    const std::string command = rest[0];
    // Options after the command; what is left are its positional arguments.
    bool json = false;
    bool global = false;
    std::chrono::milliseconds interval{1000};
    std::optional<long> count;
    std::optional<std::chrono::milliseconds> wait;
    std::vector<std::string> pos;
    for (std::size_t i = 1; i < rest.size(); ++i) {
        const std::string& a = rest[i];
        auto value = [&]() -> const std::string& {
            if (i + 1 >= rest.size()) {
                throw usage_error{a + " needs a value"};
            }
            return rest[++i];
        };
        if (a == "--json" && command == "list") {
            json = true;
        } else if (a == "--global" && command == "limit") {
            global = true;
        } else if (a == "--interval" && command == "watch") {
            interval = duration_arg(value());
        } else if (a == "--count" && command == "watch") {
            const std::string& v = value();
            char* end = nullptr;
            const long n = std::strtol(v.c_str(), &end, 10);
            if (v.empty() || *end != '\0' || n <= 0) {
                throw usage_error{"--count needs a positive number, not '" + v + "'"};
            }
            count = n;
        } else if (a == "--wait" && command == "limit") {
            wait = duration_arg(value());
        } else if (a.starts_with("--")) {
            throw usage_error{"unknown option '" + a + "' for '" + command + "'"};
        } else {
            pos.push_back(a);
        }
    }
    if (command == "list" && pos.empty()) {
        return list(segment, json);
    }
    if (command == "watch" && pos.empty()) {
        return watch(segment, interval, count);
    }
    if (command == "limit" && global && pos.size() == 1) {
        return limit(segment, std::nullopt, size_arg(pos[0]), wait);
    }
    if (command == "limit" && !global && pos.size() == 2) {
        return limit(segment, pos[0], size_arg(pos[1]), wait);
    }
    if (command == "remove" && pos.size() == 1) {
        return remove(segment, pos[0]);
    }
    throw usage_error{"wrong arguments for '" + command + "'"};
}

} // namespace

int main(int argc, char** argv) {
    try {
        return run(std::vector<std::string>(argv + 1, argv + argc));
    } catch (const usage_error& e) {
        std::cerr << "vmmpp-budget: " << e.what << "\n" << help_text;
        return usage;
    } catch (const vmmpp::no_such_segment& e) {
        std::cerr << "vmmpp-budget: " << e.what() << "\n";
        return missing_segment;
    } catch (const vmmpp::incompatible_segment& e) {
        std::cerr << "vmmpp-budget: " << e.what() << "\n";
        return foreign_segment;
    } catch (const vmmpp::untrusted_segment& e) {
        std::cerr << "vmmpp-budget: " << e.what() << "\n";
        return foreign_segment;
    } catch (const vmmpp::unknown_model& e) {
        std::cerr << "vmmpp-budget: " << e.what() << "\n";
        return unknown_model;
    } catch (const vmmpp::model_in_use& e) {
        std::cerr << "vmmpp-budget: " << e.what() << "\n";
        return model_in_use;
    } catch (const std::exception& e) {
        std::cerr << "vmmpp-budget: " << e.what() << "\n";
        return failed;
    }
}
