// bench_multi_model: multi-model serving, elastic against static, on one request trace.
//
// N models (kinds cycle 1B-, 8B-, 70B-like, models.hpp) serve the trace's requests. The same
// discrete-event simulator (simulator.hpp) runs three times, each with real kv_caches:
//   unconstrained  host memory, no budget, memory time not charged (deterministic): measures the
//                  working set the trace needs; the budget is derived from it
//   static         each model a preallocated cache of its slice of the budget (total / N, or in
//                  proportion to its working set with --static-split proportional)
//   elastic        every model's cache may reserve the whole budget; one vmmpp::budget of `total`
//                  (register_model(name, total)) decides who commits what
// `--backing host` runs static and elastic on CPU memory (pool_config<host, preallocated,
// unlimited> and pool_config<host, page_granular, shared_budget>: mmap + mprotect/madvise);
// `--backing gpu` on the GPU (vmmpp::static_config: cudaMalloc, and vmmpp::elastic_config: CUDA
// VMM). The elastic caches are block_major by default (a block is one contiguous range: one hold,
// the finest elasticity; layer_major holds 2 x layers pieces per block, so each model commits at
// least 2 x layers pages); `--layout layer` switches both modes to layer_major.
//
// Output: a markdown table on stdout (and --markdown FILE), JSON with every figure, sorted TTFTs
// and the committed-memory timeline (--json FILE). bench/multi_model/run drives a whole sweep.
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "models.hpp"
#include "report.hpp"
#include "simulator.hpp"
#include "trace.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/driver/api.hpp"

namespace {

using namespace multi_model;

constexpr std::size_t MiB = std::size_t{1} << 20;
constexpr std::size_t GiB = std::size_t{1} << 30;
/// Pages of every backing here are 2 MiB; slices are whole pages.
constexpr std::size_t page = 2 * MiB;
/// The budget is rounded up to this (a multiple of N pages for N up to 32).
constexpr std::size_t budget_rounding = 64 * MiB;
/// Address space each cache of the unconstrained run reserves (host, nothing committed up front).
constexpr std::size_t unconstrained_capacity = 256 * GiB;

/// The two configurations an experiment compares, on one kind of memory.
template <class Elastic, class Static>
struct config_pair {
    using elastic = Elastic;
    using fixed = Static;
};
using host_pair = config_pair<vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::shared_budget>,
                              vmmpp::pool_config<vmmpp::host, vmmpp::preallocated, vmmpp::unlimited>>;
using gpu_pair = config_pair<vmmpp::elastic_config, vmmpp::static_config>;
/// The calibration run: host memory, page-granular, no limit.
using unconstrained_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::unlimited>;

struct arguments {
    std::string trace_path;
    std::string scenario;
    std::string backing = "host";
    std::string layout = "block";
    std::string static_split = "equal";
    std::vector<std::string> modes{"static", "elastic"};
    double total_factor = 3.0;
    std::size_t total_mib = 0;
    std::string json_path;
    std::string markdown_path;
    sim_options options;
};

const char* const usage =
    "usage: bench_multi_model --trace FILE [--scenario NAME] [--backing host|gpu] [--layout block|layer]\n"
    "         [--total-factor F (3)] [--total-mib MIB] [--static-split equal|proportional]\n"
    "         [--modes static,elastic] [--max-batch-tokens T (8192)] [--max-running R (256)]\n"
    "         [--no-memory-time] [--json FILE] [--markdown FILE]\n";

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> parts;
    std::stringstream in(s);
    for (std::string part; std::getline(in, part, sep);) {
        if (!part.empty()) {
            parts.push_back(part);
        }
    }
    return parts;
}

arguments parse(int argc, char** argv) {
    arguments a;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") {
            std::cout << usage;
            std::exit(0);
        }
        if (flag == "--no-memory-time") {
            a.options.charge_memory_time = false;
            continue;
        }
        if (i + 1 >= argc) {
            throw std::invalid_argument(flag + " needs a value");
        }
        const std::string v = argv[++i];
        if (flag == "--trace") a.trace_path = v;
        else if (flag == "--scenario") a.scenario = v;
        else if (flag == "--backing") a.backing = v;
        else if (flag == "--layout") a.layout = v;
        else if (flag == "--static-split") a.static_split = v;
        else if (flag == "--modes") a.modes = split(v, ',');
        else if (flag == "--total-factor") a.total_factor = std::stod(v);
        else if (flag == "--total-mib") a.total_mib = std::stoull(v);
        else if (flag == "--max-batch-tokens") a.options.limits.max_batch_prefill_tokens = std::stoull(v);
        else if (flag == "--max-running") a.options.limits.max_running = std::stoull(v);
        else if (flag == "--json") a.json_path = v;
        else if (flag == "--markdown") a.markdown_path = v;
        else throw std::invalid_argument("unknown option " + flag);
    }
    const auto one_of = [](const std::string& v, std::initializer_list<const char*> allowed) {
        return std::any_of(allowed.begin(), allowed.end(), [&](const char* x) { return v == x; });
    };
    if (a.trace_path.empty()) throw std::invalid_argument("--trace is required");
    if (!one_of(a.backing, {"host", "gpu"})) throw std::invalid_argument("--backing must be host or gpu");
    if (!one_of(a.layout, {"block", "layer"})) throw std::invalid_argument("--layout must be block or layer");
    if (!one_of(a.static_split, {"equal", "proportional"})) {
        throw std::invalid_argument("--static-split must be equal or proportional");
    }
    if (a.modes.empty() || !std::all_of(a.modes.begin(), a.modes.end(), [&](const std::string& m) {
            return one_of(m, {"static", "elastic"});
        })) {
        throw std::invalid_argument("--modes takes static and/or elastic");
    }
    if (!(a.total_factor > 0)) throw std::invalid_argument("--total-factor must be positive");
    if (a.scenario.empty()) {  // "bench/traces/bursty-n4-seed1.csv" -> "bursty-n4-seed1"
        const auto slash = a.trace_path.find_last_of('/');
        a.scenario = a.trace_path.substr(slash == std::string::npos ? 0 : slash + 1);
        a.scenario = a.scenario.substr(0, a.scenario.rfind(".csv"));
    }
    return a;
}

std::size_t round_up(std::size_t x, std::size_t unit) { return (x + unit - 1) / unit * unit; }
std::size_t round_down(std::size_t x, std::size_t unit) { return x / unit * unit; }

/// Replays the trace once on `Config`: one cache per model holding at most bytes[i], drawing on
/// one budget of `shared_limit` bytes when the configuration's quota is a shared_budget.
template <class Config, class Layout>
run_result run_mode(const std::string& mode, const trace& t, const std::vector<model_spec>& models,
                    const std::vector<std::size_t>& bytes, std::size_t shared_limit, const sim_options& options) {
    std::optional<vmmpp::budget> budget;
    if (shared_limit > 0) {
        budget.emplace(shared_limit);
    }
    std::vector<std::unique_ptr<vmmpp::kv_cache<Config, Layout>>> caches;
    for (std::size_t i = 0; i < models.size(); ++i) {
        caches.push_back(make_cache<Config, Layout>(models[i], bytes[i], budget ? &*budget : nullptr));
    }
    simulator<Config, Layout> sim(mode, t, models, std::move(caches), shared_limit, options);
    return sim.run();
}

/// Bytes of the longest request of each model (whole blocks).
std::vector<std::size_t> largest_requests(const trace& t, const std::vector<model_spec>& models) {
    std::vector<std::size_t> largest(models.size(), 0);
    for (const request& r : t.requests) {
        const model_spec& m = models[r.model];
        largest[r.model] = std::max(largest[r.model], m.geometry.blocks_for(std::size_t{r.prompt_tokens} + r.output_tokens) *
                                                           m.block_bytes());
    }
    return largest;
}

/// Sets the budget and the static slices from the unconstrained run: total = max(factor x mean
/// working set, floor), where the floor lets an equal slice hold the trace's longest request.
void size_budget(experiment& e, const arguments& a, const trace& t) {
    const run_result& u = e.runs.front();
    const std::size_t n = e.models.size();
    e.working_set = static_cast<std::size_t>(u.mean_committed);
    for (const model_result& m : u.models) {
        e.model_working_set.push_back(static_cast<std::size_t>(m.mean_committed));
    }
    const std::vector<std::size_t> largest = largest_requests(t, e.models);
    e.floor = n * round_up(*std::max_element(largest.begin(), largest.end()) + page, page);
    e.total_factor = a.total_factor;
    e.total_given = a.total_mib > 0;
    e.total = a.total_mib > 0 ? a.total_mib * MiB
                              : round_up(std::max(static_cast<std::size_t>(a.total_factor * static_cast<double>(e.working_set)), e.floor),
                                         budget_rounding);
    if (a.static_split == "equal") {
        e.static_slices.assign(n, round_down(e.total / n, page));
        return;
    }
    // Proportional: each model first gets room for its longest request, the rest goes by working set.
    const std::size_t reserved = std::accumulate(largest.begin(), largest.end(), std::size_t{0}) + n * page;
    if (reserved > e.total) {
        throw std::runtime_error("--static-split proportional: the budget " + std::to_string(e.total / MiB) +
                                 " MiB cannot hold every model's longest request (" + std::to_string(reserved / MiB) +
                                 " MiB)");
    }
    const double rest = static_cast<double>(e.total - reserved);
    const double ws = std::max(1.0, static_cast<double>(e.working_set));
    for (std::size_t i = 0; i < n; ++i) {
        const double share = rest * static_cast<double>(e.model_working_set[i]) / ws;
        e.static_slices.push_back(round_down(largest[i] + page + static_cast<std::size_t>(share), page));
    }
}

template <class Pair, class Layout>
experiment run_experiment(const trace& t, const arguments& a) {
    experiment e;
    e.scenario = a.scenario;
    e.trace_path = a.trace_path;
    e.backing = a.backing;
    e.layout = a.layout == "layer" ? "layer_major" : "block_major";
    e.static_split = a.static_split;
    e.models = make_models(t.models);
    e.options = a.options;
    const std::size_t n = e.models.size();

    sim_options calibration = a.options;
    calibration.charge_memory_time = false;
    e.runs.push_back(run_mode<unconstrained_config, Layout>("unconstrained", t, e.models,
                                                           std::vector<std::size_t>(n, unconstrained_capacity), 0,
                                                           calibration));
    const figures u = overall_figures(e.runs.front());
    if (u.rejected + u.unfinished > 0) {
        std::cerr << "bench_multi_model: warning: the unconstrained run rejected " << u.rejected << " and left "
                  << u.unfinished << " requests: the working set is underestimated\n";
    }
    size_budget(e, a, t);

    for (const std::string& mode : a.modes) {
        if (mode == "static") {
            e.runs.push_back(run_mode<typename Pair::fixed, Layout>("static", t, e.models, e.static_slices, 0, a.options));
        } else {
            e.runs.push_back(run_mode<typename Pair::elastic, Layout>("elastic", t, e.models,
                                                                     std::vector<std::size_t>(n, e.total), e.total,
                                                                     a.options));
        }
    }
    return e;
}

template <class Pair>
experiment run_with_layout(const trace& t, const arguments& a) {
    return a.layout == "layer" ? run_experiment<Pair, vmmpp::layer_major>(t, a)
                               : run_experiment<Pair, vmmpp::block_major>(t, a);
}

void write_file(const std::string& path, const std::string& text) {
    std::ofstream out(path);
    out << text;
    if (!out) {
        throw std::runtime_error("cannot write " + path);
    }
}

} // namespace

int main(int argc, char** argv) {
    try {
        const arguments a = parse(argc, argv);
        if (a.backing == "gpu" && vmmpp::driver::device_count() == 0) {
            std::cerr << "bench_multi_model: --backing gpu, but no CUDA device is visible\n";
            return 2;
        }
        const trace t = load_trace(a.trace_path);
        const experiment e = a.backing == "gpu" ? run_with_layout<gpu_pair>(t, a) : run_with_layout<host_pair>(t, a);

        std::ostringstream markdown;
        write_markdown(markdown, e);
        std::cout << markdown.str();
        for (const run_result& r : e.runs) {
            std::cout << "(" << r.mode << ": " << r.wall_s << " s wall, " << r.makespan_us / 1e6 << " s simulated)\n";
        }
        if (!a.markdown_path.empty()) {
            write_file(a.markdown_path, markdown.str());
        }
        if (!a.json_path.empty()) {
            std::ostringstream json;
            write_json(json, e);
            write_file(a.json_path, json.str());
        }
        for (const run_result& r : e.runs) {
            if (overall_figures(r).unfinished > 0) {
                std::cerr << "bench_multi_model: " << r.mode << " left requests unfinished\n";
                return 1;
            }
        }
        return 0;
    } catch (const std::exception& ex) {
        std::cerr << "bench_multi_model: " << ex.what() << "\n" << usage;
        return 1;
    }
}
