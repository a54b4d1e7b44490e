// vmmpp/backing/fault_injecting.hpp: fault_injecting<Upstream>, a backing that wraps another one
// (as RMM's adaptors wrap a memory resource) and refuses commits on purpose: past a byte limit
// (a real policy: cap what a pool may take from a backing, below the backing's capacity), or at
// the Nth commit a shared fault_plan names (what reliability tests use to prove that every
// operation survives a failing commit unchanged). Everything else is forwarded untouched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/detail/backing_adaptor.hpp"
#include "vmmpp/backing/external.hpp"
#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// When a fault_injecting backing fails on purpose. Thread safe; shared (through a shared_ptr in
/// the options) between a test and the backings it drives, so the test can re-arm it between
/// operations, and by several backings at once (their calls are counted together).
///
/// Counting: every commit (decommit) call that reaches a backing using this plan counts, the
/// failing ones included; commit #1 is the first commit the plan ever saw.
class fault_plan {
public:
    /// The `n`th commit call from now fails (1: the next one), once; 0 disarms. Re-arming
    /// replaces an earlier arming.
    void fail_commit_in(std::uint64_t n) noexcept {
        std::lock_guard lock(mutex_);
        commit_fails_at_ = n == 0 ? 0 : commits_ + n;
    }
    /// The `n`th decommit call from now fails (1: the next one), once; 0 disarms.
    void fail_decommit_in(std::uint64_t n) noexcept {
        std::lock_guard lock(mutex_);
        decommit_fails_at_ = n == 0 ? 0 : decommits_ + n;
    }
    /// Disarms both.
    void disarm() noexcept {
        std::lock_guard lock(mutex_);
        commit_fails_at_ = 0;
        decommit_fails_at_ = 0;
    }

    /// Whether a commit (decommit) failure is still to come.
    [[nodiscard]] bool commit_armed() const noexcept {
        std::lock_guard lock(mutex_);
        return commit_fails_at_ != 0;
    }
    [[nodiscard]] bool decommit_armed() const noexcept {
        std::lock_guard lock(mutex_);
        return decommit_fails_at_ != 0;
    }
    /// Commit (decommit) calls seen so far, failed ones included.
    [[nodiscard]] std::uint64_t commits_seen() const noexcept {
        std::lock_guard lock(mutex_);
        return commits_;
    }
    [[nodiscard]] std::uint64_t decommits_seen() const noexcept {
        std::lock_guard lock(mutex_);
        return decommits_;
    }
    /// Failures injected so far (commits and decommits).
    [[nodiscard]] std::uint64_t faults_injected() const noexcept {
        std::lock_guard lock(mutex_);
        return faults_;
    }

    /// Counts one commit call; returns its number (1-based) if it must fail, else 0.
    [[nodiscard]] std::uint64_t on_commit() noexcept { return count(commits_, commit_fails_at_); }
    /// Counts one decommit call; returns its number (1-based) if it must fail, else 0.
    [[nodiscard]] std::uint64_t on_decommit() noexcept { return count(decommits_, decommit_fails_at_); }

private:
    std::uint64_t count(std::uint64_t& calls, std::uint64_t& fails_at) noexcept {
        std::lock_guard lock(mutex_);
        ++calls;
        if (fails_at != 0 && calls == fails_at) {
            fails_at = 0;
            ++faults_;
            return calls;
        }
        return 0;
    }

    mutable std::mutex mutex_;
    std::uint64_t commits_ = 0;
    std::uint64_t decommits_ = 0;
    std::uint64_t commit_fails_at_ = 0;  // 0: not armed
    std::uint64_t decommit_fails_at_ = 0;
    std::uint64_t faults_ = 0;
};

/// Construction options of vmmpp::fault_injecting<Upstream>. (At namespace scope, not nested:
/// GCC rejects `options opts = {}` default arguments naming a nested class with default member
/// initializers.)
template <class Upstream>
struct fault_injecting_options {
    /// The wrapped backing's own options.
    typename Upstream::options upstream{};
    /// Most bytes the wrapped backing may have committed at once; a commit past it throws
    /// out_of_memory("byte limit", ...). No limit by default.
    std::size_t byte_limit = SIZE_MAX;
    /// Planned failures; none when null.
    std::shared_ptr<fault_plan> plan{};
};

/// A backing adaptor that forwards to `Upstream` and fails commits on purpose.
///
/// A refused commit throws vmmpp::out_of_memory before anything reaches `Upstream`, so the
/// upstream and this adaptor are unchanged: "fault injection: commit #N" (N as counted by the
/// plan; limit() = the bytes committed then) or "byte limit" (limit() = the byte limit). The plan
/// is asked first: a planned failure is consumed even when the byte limit would refuse too.
/// A planned decommit failure throws vmmpp::error ("fault injection: decommit #N") with nothing
/// decommitted, as a driver failure in cuMemUnmap would.
///
/// Accessibility properties, `is_elastic`, `device_ordinal()` and the capabilities (a vmm's
/// handle cache, thread binding and handle export) are those of `Upstream`; the
/// adaptor is exactly as thread safe as `Upstream` (the plan itself is thread safe).
template <class Upstream>
class fault_injecting : public detail::backing_adaptor<Upstream> {
    using base_type = detail::backing_adaptor<Upstream>;
    using base_type::upstream_;

    static_assert(backing<Upstream>, "vmmpp::fault_injecting<Upstream>: Upstream does not model vmmpp::backing");

public:
    using options = fault_injecting_options<Upstream>;

    explicit fault_injecting(std::size_t capacity, options opts = {})
        : base_type(capacity, std::move(opts.upstream)), byte_limit_(opts.byte_limit), plan_(std::move(opts.plan)) {}
    fault_injecting(const fault_injecting&) = delete;
    fault_injecting& operator=(const fault_injecting&) = delete;
    ~fault_injecting() = default;

    /// Fails as planned or past the byte limit (out_of_memory, nothing changed), else forwards.
    void commit(std::size_t offset, std::size_t bytes) {
        const std::size_t committed = upstream_.committed_bytes();
        if (plan_) {
            if (const std::uint64_t n = plan_->on_commit(); n != 0) {
                throw out_of_memory("fault injection: commit #" + std::to_string(n), bytes, committed, committed);
            }
        }
        if (committed > byte_limit_ || bytes > byte_limit_ - committed) {
            throw out_of_memory("byte limit", bytes, committed, byte_limit_);
        }
        upstream_.commit(offset, bytes);
    }

    /// Fails as planned (vmmpp::error, nothing changed), else forwards.
    void decommit(std::size_t offset, std::size_t bytes) {
        if (plan_) {
            if (const std::uint64_t n = plan_->on_decommit(); n != 0) {
                throw error("fault injection: decommit #" + std::to_string(n) + " of [" + std::to_string(offset) +
                            ", +" + std::to_string(bytes) + ")");
            }
        }
        upstream_.decommit(offset, bytes);
    }

    [[nodiscard]] std::size_t byte_limit() const noexcept { return byte_limit_; }
    /// The plan this backing asks; null when none.
    [[nodiscard]] const std::shared_ptr<fault_plan>& plan() const noexcept { return plan_; }

    template <class P>
        requires has_property<Upstream, P>
    friend constexpr void get_property(const fault_injecting&, P) noexcept {}

private:
    std::size_t byte_limit_;
    std::shared_ptr<fault_plan> plan_;
};

static_assert(backing<fault_injecting<external<host_accessible>>>, "vmmpp::fault_injecting must model vmmpp::backing");
static_assert(has_property<fault_injecting<external<host_accessible>>, host_accessible> &&
                  !has_property<fault_injecting<external<host_accessible>>, device_accessible>,
              "vmmpp::fault_injecting must forward exactly its upstream's accessibility properties");
static_assert(handle_keeping_backing<fault_injecting<vmm>> && context_binding_backing<fault_injecting<vmm>> &&
                  handle_exporting_backing<fault_injecting<vmm>>,
              "vmmpp::fault_injecting<vmm> must forward the handle cache, the thread binding and the handle export");
static_assert(!handle_keeping_backing<fault_injecting<external<host_accessible>>> &&
                  !context_binding_backing<fault_injecting<external<host_accessible>>> &&
                  !handle_exporting_backing<fault_injecting<external<host_accessible>>>,
              "vmmpp::fault_injecting must add no capability its upstream lacks");

} // namespace vmmpp
