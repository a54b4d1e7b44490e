// vmmpp/detail/fence_queue.hpp: fences that tell a pool when GPU work queued before a release has
// completed, so that it unmaps memory only after the last kernel or copy that may touch it, and
// hands a block to a writer only after the reads queued before its free.
//
// Each stream has a lane of its own: fences on one stream complete in the order they were
// recorded, fences on different streams in any order, so a slow stream holds back only what
// was released behind it. Memory read from several streams waits for a fence on each of them
// (a fence_set: the newest fence per lane).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/event.hpp"

namespace vmmpp::detail {

/// The `seq`-th fence recorded on lane `lane` (a stream) of a fence_queue; seq 0 is "no fence",
/// always complete.
struct fence {
    std::uint32_t lane = 0;
    std::uint64_t seq = 0;
    friend bool operator==(const fence&, const fence&) = default;
};

/// What something waits for before it may go back or be written: at most one fence per lane,
/// the newest (a later fence on a stream completes after the earlier ones).
class fence_set {
public:
    /// Adds `f` (a no-op for "no fence"). Allocates when a lane is new to the set.
    void add(fence f) {
        if (f.seq == 0) {
            return;
        }
        for (fence& g : fences_) {
            if (g.lane == f.lane) {
                g.seq = std::max(g.seq, f.seq);
                return;
            }
        }
        fences_.push_back(f);
    }
    void add(const fence_set& other) {
        for (const fence& f : other.fences_) {
            add(f);
        }
    }
    [[nodiscard]] bool empty() const noexcept { return fences_.empty(); }
    [[nodiscard]] std::span<const fence> items() const noexcept { return fences_; }
    void clear() noexcept { fences_.clear(); }
    /// Drops the fences `done` says have completed.
    template <class Done>
    void forget_if(Done done) noexcept {
        std::erase_if(fences_, done);
    }

private:
    std::vector<fence> fences_;
};

/// The fences of one device, recorded on callers' streams and polled without waiting.
/// Not thread safe: the pool calls it under its own lock.
class fence_queue {
public:
    /// Fences for work on device `ordinal` (-1: host memory, where every fence is complete at
    /// once). Touches no driver until the first record.
    explicit fence_queue(int ordinal) noexcept : ordinal_(ordinal) {}
    fence_queue(const fence_queue&) = delete;
    fence_queue& operator=(const fence_queue&) = delete;
    ~fence_queue() = default;

    /// Records a fence after the work queued on `stream` so far (cuEventRecord; the caller's
    /// thread does not wait). For host memory no GPU work can touch it: returns "no fence".
    /// Polls the stream's lane first, so fences that nobody asks about do not pile up.
    [[nodiscard]] fence record(CUstream stream) {
        if (ordinal_ < 0) {
            return {};
        }
        if (!context_) {
            context_.emplace(ordinal_);
        }
        scoped_context current(*context_);
        const std::uint32_t l = lane_for(stream);  // may throw: nothing recorded yet
        lane& ln = lanes_[l];
        poll_lane(ln);
        spare_.reserve(max_spare_events);  // retire() must not allocate
        if (ln.pending.size() == ln.pending.capacity()) {  // the push below must not throw after the record
            ln.pending.reserve(2 * ln.pending.size() + 4);
        }
        stream_event e;
        if (!spare_.empty()) {
            e = std::move(spare_.back());
            spare_.pop_back();
        } else {
            e = stream_event::create();
        }
        e.record(stream);  // on failure `e` is dropped; no fence was made
        ln.pending.push_back({ln.recorded + 1, std::move(e)});
        ++ln.recorded;
        ++recorded_;
        return {l, ln.recorded};
    }

    /// Whether fence `f` has completed, as of the last poll. A lane this queue never had is an
    /// unknown fence: not complete.
    [[nodiscard]] bool is_complete(fence f) const noexcept {
        return f.seq == 0 || (f.lane < lanes_.size() && f.seq <= lanes_[f.lane].completed);
    }
    [[nodiscard]] bool is_complete(const fence_set& s) const noexcept {
        return std::all_of(s.items().begin(), s.items().end(), [&](const fence& f) { return is_complete(f); });
    }
    /// Whether `f` names a fence this queue recorded (its lane exists and has come that far).
    [[nodiscard]] bool recorded(fence f) const noexcept {
        return f.seq == 0 || (f.lane < lanes_.size() && f.seq <= lanes_[f.lane].recorded);
    }
    /// Fences recorded and not yet seen complete.
    [[nodiscard]] std::size_t pending() const noexcept {
        std::size_t n = 0;
        for (const lane& ln : lanes_) {
            n += ln.pending.size();
        }
        return n;
    }
    /// Fences recorded so far.
    [[nodiscard]] std::uint64_t recorded_count() const noexcept { return recorded_; }
    /// The stream of lane `l` (the newest stream given to it).
    [[nodiscard]] CUstream stream_of(std::uint32_t l) const noexcept { return lanes_[l].stream; }

    /// Asks the driver which fences completed, oldest first on each stream, without waiting.
    /// A fence whose work failed (a lost context) throws cuda_error.
    void poll() {
        if (pending() == 0) {
            return;
        }
        scoped_context current(*context_);
        for (lane& ln : lanes_) {
            poll_lane(ln);
        }
    }

    /// Queues on `stream` a wait for fence `f` (cuStreamWaitEvent): work queued there later runs
    /// after the work before `f`. Nothing for a complete fence. The caller's thread does not wait.
    void make_wait(CUstream stream, fence f) {
        if (is_complete(f) || f.lane >= lanes_.size()) {
            return;
        }
        const lane& ln = lanes_[f.lane];
        for (const auto& p : ln.pending) {
            if (p.first == f.seq) {
                scoped_context current(*context_);
                driver::check(driver::get().stream_wait_event(stream, p.second.get(), 0), "cuStreamWaitEvent");
                return;
            }
        }
    }

    /// Whether a host function should be queued behind fence `f` to say when it completes: it
    /// has not, and its stream has no host function of ours outstanding (one per stream at a
    /// time; see release_agent). Marks one outstanding: the caller queues it now.
    [[nodiscard]] bool needs_host_function(fence f) noexcept {
        if (is_complete(f) || f.lane >= lanes_.size() || lanes_[f.lane].host_function_outstanding) {
            return false;
        }
        lanes_[f.lane].host_function_outstanding = true;
        return true;
    }
    /// The host function queued on lane `l`'s stream has run (or failed to queue).
    void host_function_done(std::uint32_t l) noexcept {
        if (l < lanes_.size()) {
            lanes_[l].host_function_outstanding = false;
        }
    }
    /// Calls f(stream of lane `l`) with the device's context current.
    template <class F>
    void on_stream_of(std::uint32_t l, F&& f) {
        scoped_context current(*context_);
        std::forward<F>(f)(lanes_[l].stream);
    }

    /// Waits until every fence recorded so far has completed (the pool's destructor, or a caller
    /// who asks to wait).
    void wait_all() {
        if (pending() == 0) {
            return;
        }
        scoped_context current(*context_);
        for (lane& ln : lanes_) {
            for (auto& p : ln.pending) {
                p.second.synchronize();
            }
            retire(ln, ln.pending.size());
        }
    }

private:
    struct lane {
        CUstream stream = nullptr;
        std::vector<std::pair<std::uint64_t, stream_event>> pending;  // oldest first
        std::uint64_t recorded = 0;   // newest fence number on this lane
        std::uint64_t completed = 0;  // every fence up to this number has completed
        bool host_function_outstanding = false;  // queued on this stream and not yet run (needs_host_function)
    };

    /// The lane of `stream`: its own, or a new one, or (past max_lanes, for engines that make
    /// streams as they go) a lane with nothing pending: its numbers go on, so its old fences
    /// stay complete.
    std::uint32_t lane_for(CUstream stream) {
        for (std::size_t l = 0; l < lanes_.size(); ++l) {
            if (lanes_[l].stream == stream) {
                return static_cast<std::uint32_t>(l);
            }
        }
        for (std::size_t l = 0; lanes_.size() >= max_lanes && l < lanes_.size(); ++l) {
            if (lanes_[l].pending.empty() && !lanes_[l].host_function_outstanding) {
                lanes_[l].stream = stream;
                return static_cast<std::uint32_t>(l);
            }
        }
        lanes_.push_back({stream, {}, 0, 0, false});
        return static_cast<std::uint32_t>(lanes_.size() - 1);
    }
    void poll_lane(lane& ln) {
        std::size_t done = 0;
        while (done < ln.pending.size() && ln.pending[done].second.query()) {
            ++done;
        }
        retire(ln, done);
    }
    void retire(lane& ln, std::size_t done) {
        if (done == 0) {
            return;
        }
        ln.completed = ln.pending[done - 1].first;
        for (std::size_t i = 0; i < done; ++i) {
            if (spare_.size() < max_spare_events) {
                spare_.push_back(std::move(ln.pending[i].second));
            }
        }
        ln.pending.erase(ln.pending.begin(), ln.pending.begin() + static_cast<std::ptrdiff_t>(done));
    }

    static constexpr std::size_t max_spare_events = 64;
    static constexpr std::size_t max_lanes = 32;

    int ordinal_;
    std::optional<primary_context> context_;  // retained on first use, kept while the pool lives
    std::vector<lane> lanes_;                  // never shrinks: fences name lanes by index
    std::vector<stream_event> spare_;          // completed events, recorded again later
    std::uint64_t recorded_ = 0;
};

} // namespace vmmpp::detail
