// bench/multi_model/trace.hpp: the request trace the simulator replays, read from the CSV that
// bench/traces/make_traces.py writes (`arrival_us,model,prompt_tokens,output_tokens`, after `#`
// comment lines). Kept apart from the simulator so that a trace from elsewhere (a production log
// turned into this CSV) needs nothing else.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace multi_model {

/// One request: when it arrives, which model serves it, and how long it is.
struct request {
    double arrival_us = 0;
    std::uint32_t model = 0;
    std::uint32_t prompt_tokens = 0;
    std::uint32_t output_tokens = 0;
};

/// A whole trace, sorted by arrival (ties keep file order).
struct trace {
    std::string path;
    std::uint32_t models = 0;  ///< `models=N` from a comment line, else the largest model index + 1
    std::vector<request> requests;
};

/// Reads a trace CSV; throws std::runtime_error naming the file and line on a malformed line.
inline trace load_trace(const std::string& path) {
    std::ifstream in(path);
    if (!in) {
        throw std::runtime_error("cannot open trace " + path);
    }
    trace t{path, 0, {}};
    std::uint32_t declared = 0;
    std::string line;
    for (std::size_t number = 1; std::getline(in, line); ++number) {
        if (line.empty() || line.starts_with("arrival_us")) {
            continue;
        }
        if (line.starts_with("#")) {
            if (const auto at = line.find(" models="); at != std::string::npos) {
                declared = static_cast<std::uint32_t>(std::stoul(line.substr(at + 8)));
            }
            continue;
        }
        std::istringstream fields(line);
        long long arrival = 0;
        long long model = 0;
        long long prompt = 0;
        long long output = 0;
        char c1 = 0;
        char c2 = 0;
        char c3 = 0;
        if (!(fields >> arrival >> c1 >> model >> c2 >> prompt >> c3 >> output) || c1 != ',' || c2 != ',' ||
            c3 != ',' || arrival < 0 || model < 0 || prompt < 1 || output < 1) {
            throw std::runtime_error(path + ":" + std::to_string(number) +
                                     ": expected arrival_us,model,prompt_tokens,output_tokens (non-negative, "
                                     "lengths >= 1): '" + line + "'");
        }
        t.requests.push_back({static_cast<double>(arrival), static_cast<std::uint32_t>(model),
                              static_cast<std::uint32_t>(prompt), static_cast<std::uint32_t>(output)});
        t.models = std::max(t.models, static_cast<std::uint32_t>(model) + 1);
    }
    if (t.requests.empty()) {
        throw std::runtime_error("trace " + path + " holds no requests");
    }
    if (declared != 0) {
        if (declared < t.models) {
            throw std::runtime_error("trace " + path + " declares models=" + std::to_string(declared) +
                                     " but uses model " + std::to_string(t.models - 1));
        }
        t.models = declared;
    }
    std::stable_sort(t.requests.begin(), t.requests.end(),
                     [](const request& a, const request& b) { return a.arrival_us < b.arrival_us; });
    return t;
}

} // namespace multi_model
