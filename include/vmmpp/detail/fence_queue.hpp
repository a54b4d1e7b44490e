// vmmpp/detail/fence_queue.hpp: fences that tell a pool when GPU work queued before a release has
// completed, so that it unmaps memory only after the last kernel or copy that may touch it.
// Fences are numbered in the order they are recorded; a number counts as complete only once it
// and every earlier one have completed, which is conservative across streams and makes "may this
// unit go back?" a single comparison.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <utility>
#include <vector>

#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/event.hpp"

namespace vmmpp::detail {

/// The fences of one device, recorded on caller's streams and polled without waiting.
/// Not thread safe: the pool calls it under its own lock.
class fence_queue {
public:
    /// Fence number 0 means "no fence": always complete.
    using fence = std::uint64_t;

    /// Fences for work on device `ordinal` (-1: host memory, where every fence is complete at
    /// once). Touches no driver until the first record.
    explicit fence_queue(int ordinal) noexcept : ordinal_(ordinal) {}
    fence_queue(const fence_queue&) = delete;
    fence_queue& operator=(const fence_queue&) = delete;
    ~fence_queue() = default;

    /// Records a fence after the work queued on `stream` so far (cuEventRecord; the caller's
    /// thread does not wait). For host memory no GPU work can touch it: returns 0.
    [[nodiscard]] fence record(CUstream stream) {
        if (ordinal_ < 0) {
            return 0;
        }
        if (!context_) {
            context_.emplace(ordinal_);
        }
        scoped_context current(*context_);
        spare_.reserve(max_spare_events);  // retire() must not allocate
        stream_event e;
        if (!spare_.empty()) {
            e = std::move(spare_.back());
            spare_.pop_back();
        } else {
            e = stream_event::create();
        }
        if (pending_.size() == pending_.capacity()) {  // the push below must not throw after the record
            pending_.reserve(2 * pending_.size() + 8);
        }
        e.record(stream);                       // on failure `e` is dropped; no fence was made
        pending_.push_back({++recorded_, std::move(e)});
        return recorded_;
    }

    /// Whether fence `f` (and every earlier one) has completed, as of the last poll.
    [[nodiscard]] bool is_complete(fence f) const noexcept { return f <= completed_; }
    /// Fences recorded and not yet seen complete.
    [[nodiscard]] std::size_t pending() const noexcept { return pending_.size(); }
    /// The newest fence number handed out.
    [[nodiscard]] fence newest() const noexcept { return recorded_; }

    /// Asks the driver which fences completed, oldest first, without waiting; returns the
    /// highest complete number. A fence whose work failed (a lost context) throws cuda_error.
    fence poll() {
        if (pending_.empty()) {
            return completed_;
        }
        scoped_context current(*context_);
        std::size_t done = 0;
        while (done < pending_.size() && pending_[done].second.query()) {
            ++done;
        }
        retire(done);
        return completed_;
    }

    /// Waits until every fence recorded so far has completed (the pool's destructor, or a caller
    /// who asks to wait).
    void wait_all() {
        if (pending_.empty()) {
            return;
        }
        scoped_context current(*context_);
        for (auto& p : pending_) {  // one per fence: fences on different streams complete in any order
            p.second.synchronize();
        }
        retire(pending_.size());
    }

private:
    void retire(std::size_t done) {
        if (done == 0) {
            return;
        }
        completed_ = pending_[done - 1].first;
        for (std::size_t i = 0; i < done; ++i) {
            if (spare_.size() < max_spare_events) {
                spare_.push_back(std::move(pending_[i].second));
            }
        }
        pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(done));
    }

    static constexpr std::size_t max_spare_events = 64;

    int ordinal_;
    std::optional<primary_context> context_;  // retained on first use, kept while the pool lives
    std::vector<std::pair<fence, stream_event>> pending_;  // oldest first
    std::vector<stream_event> spare_;                      // completed events, recorded again later
    fence recorded_ = 0;
    fence completed_ = 0;
};

} // namespace vmmpp::detail
