// bench/multi_model/report.hpp: what one simulation experiment (one trace: an unconstrained
// calibration run, then static slices and the shared budget) reports: a JSON file for scripts
// (summarize.py draws the charts from it) and a markdown table with elastic/static ratios for
// people. Percentiles are nearest-rank, as in bench/common.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "models.hpp"
#include "simulator.hpp"

namespace multi_model {

/// Everything one experiment decided and measured.
struct experiment {
    std::string scenario;
    std::string trace_path;
    std::string backing;  ///< "host" or "gpu"
    std::string layout;   ///< "block_major" or "layer_major"
    std::string static_split;  ///< "equal" or "proportional"
    std::vector<model_spec> models;
    double total_factor = 0;
    std::size_t working_set = 0;             ///< mean committed of the unconstrained run, all models
    std::vector<std::size_t> model_working_set;
    std::size_t floor = 0;                   ///< N x the largest request's bytes (any static slice holds one)
    std::size_t total = 0;                   ///< the budget, and the sum of the static slices' limit
    bool total_given = false;                ///< set by --total-mib rather than derived
    std::vector<std::size_t> static_slices;
    sim_options options;
    std::vector<run_result> runs;            ///< "unconstrained", then "static" and/or "elastic"

    [[nodiscard]] const run_result* run(std::string_view mode) const {
        const auto it = std::find_if(runs.begin(), runs.end(), [&](const run_result& r) { return r.mode == mode; });
        return it == runs.end() ? nullptr : &*it;
    }
};

// ---------------------------------------------------------------------------------------------
// Figures derived from a run

struct latency {
    std::size_t count = 0;
    double p50 = 0, p90 = 0, p99 = 0, mean = 0;  // milliseconds
};

inline latency percentiles_ms(std::vector<double> us) {
    latency l;
    l.count = us.size();
    if (us.empty()) {
        return l;
    }
    std::sort(us.begin(), us.end());
    const auto at = [&](double q) { return us[std::min(us.size() - 1, static_cast<std::size_t>(q * static_cast<double>(us.size())))] / 1e3; };
    l.p50 = at(0.50);
    l.p90 = at(0.90);
    l.p99 = at(0.99);
    l.mean = std::accumulate(us.begin(), us.end(), 0.0) / static_cast<double>(us.size()) / 1e3;
    return l;
}

/// One row of figures: a model, or every model of a run together.
struct figures {
    std::string name;
    std::size_t requests = 0, completed = 0, rejected = 0, unfinished = 0;
    latency ttft;
    double throughput = 0;  ///< output tokens of completed requests per simulated second
    std::size_t peak_committed = 0;
    double mean_committed = 0;
    std::uint64_t preemptions = 0, refusals = 0, commits = 0, decommits = 0;
    std::size_t memory_waits = 0;  ///< requests that had to wait for memory at least once
    double memory_op_ms = 0, backing_ms = 0;
};

inline figures model_figures(const model_result& m) {
    return {.name = m.name,
            .requests = m.requests,
            .completed = m.completed,
            .rejected = m.rejected,
            .unfinished = m.unfinished,
            .ttft = percentiles_ms(m.ttft_us),
            .throughput = m.last_finish_us > 0 ? static_cast<double>(m.output_tokens) / (m.last_finish_us / 1e6) : 0,
            .peak_committed = m.peak_committed,
            .mean_committed = m.mean_committed,
            .preemptions = m.preemptions,
            .refusals = m.refused_quota + m.refused_blocks + m.refused_memory,
            .commits = m.commits,
            .decommits = m.decommits,
            .memory_waits = m.memory_waits,
            .memory_op_ms = m.memory_op_us / 1e3,
            .backing_ms = m.backing_us / 1e3};
}

/// Every model together: TTFT over all requests, throughput over the makespan, memory summed.
inline figures overall_figures(const run_result& r) {
    figures f;
    f.name = "all";
    std::vector<double> ttft;
    std::uint64_t tokens = 0;
    for (const model_result& m : r.models) {
        const figures mf = model_figures(m);
        f.requests += mf.requests;
        f.completed += mf.completed;
        f.rejected += mf.rejected;
        f.unfinished += mf.unfinished;
        f.preemptions += mf.preemptions;
        f.refusals += mf.refusals;
        f.memory_waits += mf.memory_waits;
        f.commits += mf.commits;
        f.decommits += mf.decommits;
        f.memory_op_ms += mf.memory_op_ms;
        f.backing_ms += mf.backing_ms;
        ttft.insert(ttft.end(), m.ttft_us.begin(), m.ttft_us.end());
        tokens += m.output_tokens;
    }
    f.ttft = percentiles_ms(std::move(ttft));
    f.throughput = r.makespan_us > 0 ? static_cast<double>(tokens) / (r.makespan_us / 1e6) : 0;
    f.peak_committed = r.peak_committed;
    f.mean_committed = r.mean_committed;
    return f;
}

/// The rows of a run: every model, then "all".
inline std::vector<figures> run_figures(const run_result& r) {
    std::vector<figures> rows;
    for (const model_result& m : r.models) {
        rows.push_back(model_figures(m));
    }
    rows.push_back(overall_figures(r));
    return rows;
}

inline std::optional<double> ratio(double a, double b) {
    return b != 0 ? std::optional<double>(a / b) : std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// JSON

/// A small streaming JSON writer: objects on indented lines, arrays on one line.
class json_writer {
public:
    explicit json_writer(std::ostream& out) : out_(out) {}

    json_writer& begin_object() { return open('{', false); }
    json_writer& end_object() { return close('}'); }
    json_writer& begin_array() { return open('[', true); }
    json_writer& end_array() { return close(']'); }
    json_writer& key(std::string_view k) {
        separate();
        string(k);
        out_ << ": ";
        after_key_ = true;
        return *this;
    }
    json_writer& value(std::string_view s) {
        separate();
        string(s);
        return *this;
    }
    json_writer& value(const char* s) { return value(std::string_view(s)); }
    json_writer& value(bool b) {
        separate();
        out_ << (b ? "true" : "false");
        return *this;
    }
    json_writer& value(double x) {
        separate();
        if (!std::isfinite(x)) {
            out_ << "null";
        } else {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.10g", x);
            out_ << buf;
        }
        return *this;
    }
    json_writer& value(std::optional<double> x) { return x ? value(*x) : null(); }
    template <class T>
        requires std::is_integral_v<T>
    json_writer& value(T x) {
        separate();
        out_ << x;
        return *this;
    }
    json_writer& null() {
        separate();
        out_ << "null";
        return *this;
    }
    /// key: value in one call.
    template <class T>
    json_writer& field(std::string_view k, const T& v) {
        return key(k).value(v);
    }

private:
    struct level {
        bool inline_items;
        bool first = true;
    };
    json_writer& open(char c, bool inline_items) {
        separate();
        out_ << c;
        levels_.push_back({inline_items});
        return *this;
    }
    json_writer& close(char c) {
        const level l = levels_.back();
        levels_.pop_back();
        if (!l.inline_items && !l.first) {
            newline();
        }
        out_ << c;
        if (levels_.empty()) {
            out_ << '\n';
        }
        return *this;
    }
    void separate() {
        if (after_key_) {
            after_key_ = false;
            return;
        }
        if (levels_.empty()) {
            return;
        }
        level& l = levels_.back();
        if (!l.first) {
            out_ << (l.inline_items ? ", " : ",");
        }
        if (!l.inline_items) {
            newline();
        }
        l.first = false;
    }
    void newline() { out_ << '\n' << std::string(2 * levels_.size(), ' '); }
    void string(std::string_view s) {
        out_ << '"';
        for (char c : s) {
            if (c == '"' || c == '\\') {
                out_ << '\\' << c;
            } else if (static_cast<unsigned char>(c) < 0x20) {
                char buf[8];
                std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
                out_ << buf;
            } else {
                out_ << c;
            }
        }
        out_ << '"';
    }

    std::ostream& out_;
    std::vector<level> levels_;
    bool after_key_ = false;
};

inline void write_figures(json_writer& j, const figures& f) {
    j.begin_object()
        .field("name", f.name)
        .field("requests", f.requests)
        .field("completed", f.completed)
        .field("rejected", f.rejected)
        .field("unfinished", f.unfinished)
        .field("ttft_ms_p50", f.ttft.p50)
        .field("ttft_ms_p90", f.ttft.p90)
        .field("ttft_ms_p99", f.ttft.p99)
        .field("ttft_ms_mean", f.ttft.mean)
        .field("throughput_tokens_per_s", f.throughput)
        .field("peak_committed_bytes", f.peak_committed)
        .field("mean_committed_bytes", f.mean_committed)
        .field("preemptions", f.preemptions)
        .field("admissions_refused", f.refusals)
        .field("requests_waited_for_memory", f.memory_waits)
        .field("commits", f.commits)
        .field("decommits", f.decommits)
        .field("memory_op_ms", f.memory_op_ms)
        .field("backing_ms", f.backing_ms)
        .end_object();
}

template <class Range>
void write_array(json_writer& j, const Range& values) {
    j.begin_array();
    for (const auto& v : values) {
        j.value(v);
    }
    j.end_array();
}

inline void write_run(json_writer& j, const run_result& r) {
    j.begin_object().field("mode", r.mode).field("makespan_s", r.makespan_us / 1e6).field("wall_s", r.wall_s);
    j.key("overall");
    write_figures(j, overall_figures(r));
    j.key("models").begin_array();
    for (const model_result& m : r.models) {
        write_figures(j, model_figures(m));
    }
    j.end_array();
    // Every TTFT in milliseconds, sorted (for CDFs), and per request's model (for per-model CDFs).
    std::vector<double> ttft_ms;
    for (const model_result& m : r.models) {
        for (double us : m.ttft_us) {
            ttft_ms.push_back(std::round(us) / 1e3);
        }
    }
    std::sort(ttft_ms.begin(), ttft_ms.end());
    j.key("ttft_ms_sorted");
    write_array(j, ttft_ms);
    j.key("committed_timeline").begin_object();
    std::vector<double> t_s;
    std::vector<std::size_t> bytes;
    for (const auto& [t, b] : r.timeline) {
        t_s.push_back(std::round(t / 1e3) / 1e3);
        bytes.push_back(b);
    }
    j.key("t_s");
    write_array(j, t_s);
    j.key("bytes");
    write_array(j, bytes);
    j.end_object();
    j.end_object();
}

inline void write_json(std::ostream& out, const experiment& e) {
    json_writer j(out);
    j.begin_object()
        .field("scenario", e.scenario)
        .field("trace", e.trace_path)
        .field("backing", e.backing)
        .field("layout", e.layout)
        .field("static_split", e.static_split)
        .field("n_models", e.models.size())
        .field("total_factor", e.total_factor)
        .field("working_set_bytes", e.working_set)
        .field("floor_bytes", e.floor)
        .field("total_bytes", e.total)
        .field("total_given", e.total_given)
        .field("charge_memory_time", e.options.charge_memory_time)
        .field("max_batch_prefill_tokens", e.options.limits.max_batch_prefill_tokens)
        .field("max_running", e.options.limits.max_running);
    j.key("models").begin_array();
    for (std::size_t i = 0; i < e.models.size(); ++i) {
        const model_spec& m = e.models[i];
        j.begin_object()
            .field("name", m.name)
            .field("kind", m.kind->name)
            .field("layers", m.geometry.layers)
            .field("kv_heads", m.geometry.kv_heads)
            .field("head_dim", m.geometry.head_dim)
            .field("block_tokens", m.geometry.block_tokens)
            .field("block_bytes", m.block_bytes())
            .field("step_base_us", m.kind->cost.base_us)
            .field("prefill_per_token_us", m.kind->cost.prefill_per_token_us)
            .field("decode_per_running_us", m.kind->cost.decode_per_running_us)
            .field("working_set_bytes", e.model_working_set[i])
            .field("static_slice_bytes", e.static_slices[i])
            .end_object();
    }
    j.end_array();
    j.key("runs").begin_object();
    for (const run_result& r : e.runs) {
        j.key(r.mode);
        write_run(j, r);
    }
    j.end_object();
    const run_result* s = e.run("static");
    const run_result* el = e.run("elastic");
    if (s != nullptr && el != nullptr) {
        const figures fs = overall_figures(*s);
        const figures fe = overall_figures(*el);
        j.key("elastic_over_static")
            .begin_object()
            .field("ttft_p50", ratio(fe.ttft.p50, fs.ttft.p50))
            .field("ttft_p90", ratio(fe.ttft.p90, fs.ttft.p90))
            .field("ttft_p99", ratio(fe.ttft.p99, fs.ttft.p99))
            .field("throughput", ratio(fe.throughput, fs.throughput))
            .field("peak_committed", ratio(static_cast<double>(fe.peak_committed), static_cast<double>(fs.peak_committed)))
            .field("mean_committed", ratio(fe.mean_committed, fs.mean_committed))
            .end_object();
    }
    j.end_object();
}

// ---------------------------------------------------------------------------------------------
// Markdown

inline std::string fixed(double x, int decimals) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", decimals, x);
    return buf;
}
/// Milliseconds with three significant-ish figures.
inline std::string ms(double x) { return fixed(x, x >= 100 ? 0 : x >= 10 ? 1 : 2); }
inline std::string gib(double bytes) { return fixed(bytes / double(1ull << 30), 2); }
inline std::string times(std::optional<double> r) { return r ? fixed(*r, 2) + "x" : "–"; }

/// The experiment's table: per model (and all), static and elastic rows, then the ratio row.
/// TTFT and memory ratios below 1 and throughput ratios above 1 favour elastic.
inline void write_markdown(std::ostream& out, const experiment& e) {
    out << "### " << e.scenario << ", " << e.models.size() << " models (" << e.backing << " backing, " << e.layout
        << ", static split " << e.static_split << ")\n\n";
    out << "Budget " << gib(static_cast<double>(e.total)) << " GiB";
    if (e.total_given) {
        out << " (given; mean unconstrained working set " << gib(static_cast<double>(e.working_set)) << " GiB)";
    } else {
        out << " = max(" << fixed(e.total_factor, 1) << " x " << gib(static_cast<double>(e.working_set))
            << " GiB mean unconstrained working set, floor " << gib(static_cast<double>(e.floor)) << " GiB), rounded up";
    }
    out << "; static slices:";
    for (std::size_t i = 0; i < e.models.size(); ++i) {
        out << (i ? ", " : " ") << e.models[i].name << " " << gib(static_cast<double>(e.static_slices[i]));
    }
    out << " GiB.\n\n";
    out << "| model | mode | done | rejected | TTFT p50 ms | p90 | p99 | tokens/s | peak GiB | mean GiB | "
           "waited for memory | preempted | memory ops ms |\n";
    out << "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    std::vector<std::vector<figures>> rows_by_run;
    for (const run_result& r : e.runs) {
        rows_by_run.push_back(run_figures(r));
    }
    const auto rows_of = [&](std::string_view mode) -> const std::vector<figures>* {
        const run_result* r = e.run(mode);
        return r == nullptr ? nullptr : &rows_by_run[static_cast<std::size_t>(r - e.runs.data())];
    };
    const auto* fs = rows_of("static");
    const auto* fe = rows_of("elastic");
    const std::size_t rows = e.models.size() + 1;
    for (std::size_t i = 0; i < rows; ++i) {
        for (std::size_t k = 0; k < e.runs.size(); ++k) {
            const figures& x = rows_by_run[k][i];
            out << "| " << (i + 1 == rows ? "**all**" : x.name) << " | " << e.runs[k].mode << " | " << x.completed << " | "
                << x.rejected << " | " << ms(x.ttft.p50) << " | " << ms(x.ttft.p90) << " | " << ms(x.ttft.p99) << " | "
                << fixed(x.throughput, 1) << " | " << gib(static_cast<double>(x.peak_committed)) << " | "
                << gib(x.mean_committed) << " | " << x.memory_waits << " | " << x.preemptions << " | "
                << fixed(x.memory_op_ms, 1) << " |\n";
        }
        if (fs != nullptr && fe != nullptr) {
            const figures& s = (*fs)[i];
            const figures& el = (*fe)[i];
            out << "| | *elastic/static* | | | *" << times(ratio(el.ttft.p50, s.ttft.p50)) << "* | *"
                << times(ratio(el.ttft.p90, s.ttft.p90)) << "* | *" << times(ratio(el.ttft.p99, s.ttft.p99)) << "* | *"
                << times(ratio(el.throughput, s.throughput)) << "* | *"
                << times(ratio(static_cast<double>(el.peak_committed), static_cast<double>(s.peak_committed)))
                << "* | *" << times(ratio(el.mean_committed, s.mean_committed)) << "* | | | |\n";
        }
    }
    out << "\n";
}

} // namespace multi_model
