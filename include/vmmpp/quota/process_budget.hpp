// vmmpp/quota/process_budget.hpp: one memory budget shared by the pools of several *processes*
// on a GPU. It works like vmmpp::budget / vmmpp::shared_budget (a global byte limit, per-model
// limits, statistics), but its state lives in a named POSIX shared-memory segment, guarded by a
// process-shared robust mutex, and a process that dies without releasing gives its share back.
// Linux only (it reads /proc). docs/MULTIPROCESS.md describes the design, and what a segment's
// owner and mode must be for a process to attach it (no other user may write it).
//
// This header holds the public types and their contracts; the parts behind them are in
// vmmpp/quota/detail/: process_identity.hpp (who a process is, from /proc; it also defines the
// public process_identity, current_process_identity() and is_process_running(), available
// through this header), budget_layout.hpp (the segment's bytes and their validation),
// robust_mutex.hpp (the lock and its repair hook), shared_mapping.hpp, futex.hpp and
// futex_watcher.hpp (the mapping, and sleeping and waking across processes), shared_segment.hpp
// (this process's mapping of a segment), segment_trust.hpp and segment_open.hpp (trusting,
// creating, attaching and unlinking one), budget_share.hpp (acquiring and releasing through a
// share, and asking other processes to give back), share_registration.hpp (registering a share),
// reclaim_answer.hpp (giving back on request or lowered limit), reclaim_dead.hpp (taking back
// dead processes' shares) and model_admin.hpp (statistics, limits, removing a model).
#pragma once

#if !defined(__linux__)
#error "vmmpp/quota/process_budget.hpp needs Linux: it reads /proc and uses robust process-shared mutexes"
#endif

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/concept.hpp"
#include "vmmpp/quota/limit_change.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/budget_share.hpp"
#include "vmmpp/quota/detail/model_admin.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/reclaim_answer.hpp"
#include "vmmpp/quota/detail/reclaim_dead.hpp"
#include "vmmpp/quota/detail/segment_open.hpp"
#include "vmmpp/quota/detail/segment_trust.hpp"
#include "vmmpp/quota/detail/share_registration.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"
#include "vmmpp/quota/shared_budget.hpp"  // model_stats, budget_stats

namespace vmmpp {

/// How a process budget's segment is created and attached.
///
/// Whoever may write a segment controls every process attached to it: its limits, its lock (a
/// process-shared robust mutex, whose robust-list links glibc follows), the usage records. So by
/// default a process attaches only segments owned by its own effective uid that neither group nor
/// others may write, and creates only such segments. The two opt-ins below widen that for
/// deployments where several users share one budget; that is at the operator's risk, because a
/// robust mutex shared with a writer that is not trusted is unsafe whatever vmmpp checks.
struct process_budget_options {
    /// Permission bits of a segment this process creates, applied exactly (umask does not
    /// narrow them). 0600: only the creating user's processes may attach. Write bits for group
    /// or others (0020, 0002) need `allow_shared_write`.
    mode_t mode = 0600;
    /// Model table size of a segment this process creates (an attacher reads the creator's).
    std::uint32_t max_models = 64;
    /// (model, process) usage records of a segment this process creates. A record is taken when
    /// a process first registers a model and freed when that process is found dead.
    std::uint32_t max_records = 1024;
    /// How long an attacher waits for a segment that another process is still initialising.
    std::chrono::milliseconds attach_timeout{5000};
    /// Owners besides this process's effective uid whose segments open, create_or_open and
    /// remove accept. Empty: only this process's own.
    std::vector<uid_t> trusted_owners{};
    /// Whether open and create_or_open accept a segment that its group or others may write, and
    /// create may make one (`mode` with 0020 or 0002).
    bool allow_shared_write = false;
    /// Whether this process runs a watcher thread for the segment: it sleeps on a futex word in
    /// the segment (no CPU while nothing happens) and, when another process posts a reclaim
    /// request (its commit was refused by a limit) or lowers a limit, gives back the spares and
    /// kept handles of this process's pools, with no call from this process. Off: this process
    /// gives nothing back on request (others are not even asked: they refuse at once), and a
    /// lowered limit reaches it through honour_limits or limit_watch only.
    bool reclaim_watch = true;
    /// How long a commit of this process refused by a limit waits for the watchers of other
    /// processes that hold enough of that limit to give their spares back (it retries as each
    /// answers, and stops as soon as every process asked has answered). Zero: it asks no one.
    /// 50 ms: well above the 20 ms a watcher waits for a busy pool's lock
    /// (elastic_pool::reclaim_wait), and short next to an engine step that cannot proceed.
    std::chrono::milliseconds reclaim_wait{50};
    /// The watcher's fallback poll: when not zero it also wakes this often to honour lowered
    /// limits (honour_limits). Not needed with the watcher on, which a lowered limit wakes; with
    /// `reclaim_watch` off, a non-zero value starts a thread that honours limits only (the
    /// polling limit watcher of earlier versions, now woken by a lowered limit at once as well).
    /// Zero with `reclaim_watch` off: no thread; call process_budget::honour_limits yourself.
    std::chrono::milliseconds limit_watch{0};
};

/// A process budget segment that these options do not let this process use: owned by another
/// user, or writable by group or others. Says whose it is, who this process is and its mode.
class untrusted_segment : public error {
public:
    untrusted_segment(const std::string& name, uid_t owner, uid_t self, mode_t mode, const std::string& why)
        : error("vmmpp process budget '" + name + "' " + why + " (owner uid " + std::to_string(owner) + ", mode " +
                octal(mode) + "; this process runs as uid " + std::to_string(self) +
                "): refused, since whoever writes the segment controls every process attached to it; "
                "process_budget_options::trusted_owners and allow_shared_write accept it at your own risk"),
          owner_(owner), self_(self), mode_(mode & 07777) {}

    /// The segment's owner (st_uid).
    [[nodiscard]] uid_t owner_uid() const noexcept { return owner_; }
    /// This process's effective uid.
    [[nodiscard]] uid_t our_uid() const noexcept { return self_; }
    /// The segment's permission bits.
    [[nodiscard]] mode_t mode() const noexcept { return mode_; }

private:
    static std::string octal(mode_t mode) {
        char text[16];
        std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
        return text;
    }
    uid_t owner_;
    uid_t self_;
    mode_t mode_;
};

/// One (model, process) usage record, as process_budget::stats() reports it.
struct process_usage {
    std::string model;
    process_identity process;
    std::size_t committed = 0;
};

/// Statistics of a process budget: those of vmmpp::budget, and what is particular to processes.
struct process_budget_stats : budget_stats {
    std::size_t reclaimed = 0;          ///< bytes ever taken back from dead processes
    std::size_t reclaimed_records = 0;  ///< usage records ever freed because their process died
    std::size_t repairs = 0;            ///< times a process found the lock's last owner dead
    std::size_t reclaim_requests = 0;   ///< reclaim requests ever posted by refused commits
    std::size_t request_grants = 0;     ///< refused commits that succeeded after asking
    std::size_t request_reclaimed = 0;  ///< bytes watchers gave back on request
    std::size_t max_models = 0;
    std::size_t max_records = 0;
    std::vector<process_usage> usage;   ///< every (model, process) record in use
};

/// One model's share of a process budget, charged to the calling process: the quota policy of
/// its pools. Copies charge the same model and process.
///
/// Thread and process safety: acquire, release, stats and process_committed may be called at
/// once from any threads of any processes; each is one critical section of the segment's lock.
/// A process_quota belongs to the process that registered it: in a child made by fork (without
/// exec), acquire throws vmmpp::invalid_argument and release does nothing; register again there.
class process_quota {
public:
    /// A copy charges the same model and process but does not inherit a registered reclaimer.
    process_quota(const process_quota& other) : share_(other.share_), hold_(other.hold_) {}
    process_quota& operator=(const process_quota& other) {
        if (this != &other) {
            clear_reclaimer();
            clear_cache_reclaimer();
            share_ = other.share_;
            hold_ = other.hold_;
        }
        return *this;
    }
    process_quota(process_quota&&) noexcept = default;
    process_quota& operator=(process_quota&& other) noexcept {
        if (this != &other) {
            clear_reclaimer();
            share_ = std::move(other.share_);
            clear_cache_reclaimer();
            reclaimer_ = std::move(other.reclaimer_);
            cache_reclaimer_ = std::move(other.cache_reclaimer_);
            hold_ = std::move(other.hold_);
        }
        return *this;
    }
    /// The last quota of this process's (model, process) record frees the record (see
    /// process_budget::register_model).
    ~process_quota() {
        clear_reclaimer();
        clear_cache_reclaimer();
    }

    /// Takes `bytes` from this model's limit and the global limit together, or throws
    /// vmmpp::over_quota naming the limit that refused it ("model <name>" or "global") and
    /// changes nothing but the denied counters. Before refusing, it takes back the shares of dead
    /// processes and tries once more. Throws vmmpp::invalid_argument in a forked child, and
    /// vmmpp::error if this process's usage record was freed (it was taken for dead).
    void acquire(std::size_t bytes) {
        check_process("acquire");
        share_.acquire(bytes);
    }

    /// acquire(bytes), but when a limit refuses and other processes whose watchers serve
    /// requests hold enough of it, asks them to give their spares back and waits for them, up
    /// to process_budget_options::reclaim_wait, retrying as they answer. A pool calls it last,
    /// after its own spares and this process's other pools failed to make room: the spares of
    /// other processes are the dearest to take. Meant for a caller whose acquire(bytes) was just
    /// refused: a refusal here is not counted again in the denied counters. Throws as acquire
    /// does (over_quota as if it had not asked, with nothing changed).
    void acquire_asking_processes(std::size_t bytes) {
        check_process("acquire");
        share_.acquire(bytes, share_.seg().request_wait(), false);
    }

    /// Gives `bytes` back to both limits (at most what this process holds of this model).
    void release(std::size_t bytes) noexcept {
        if (::getpid() == share_.who().pid) {
            share_.release(bytes);
        }
    }

    /// This model's statistics now, over every process.
    [[nodiscard]] model_stats stats() const { return share_.stats(); }

    /// Reports the spare bytes (committed or kept, held by nothing) of this process's pools of
    /// the model, for statistics and vmmpp-budget: one figure per (model, process), the last
    /// report wins (vmmpp::report_spares(pool) reads it from a pool).
    void report_spares(std::size_t bytes) const noexcept {
        if (::getpid() == share_.who().pid) {
            share_.report_spares(bytes);
        }
    }

    /// Registers `give_back` (returns the bytes it released) as this quota's way to free its
    /// pool's spares: called when another pool of this process is refused (reclaim_from_others),
    /// when a limit of its model or the global one is lowered below what is charged, by this
    /// process at once and, from other processes, through honour_limits or the watcher, and by
    /// the watcher when another process's commit is refused (acquire_asking_processes).
    /// One per quota object; a pool registers its own copy and clears it before it goes.
    void set_reclaimer(std::function<std::size_t()> give_back) {
        clear_reclaimer();
        auto r = std::make_shared<detail::pb::local_reclaimer>();
        r->give_back = std::move(give_back);
        r->model = share_.model();
        detail::pb::local_registry& reg = share_.seg().local();
        std::lock_guard lock(reg.mutex);
        reg.reclaimers.push_back(r);
        reclaimer_ = std::move(r);
    }
    /// Unregisters this quota's reclaimer; waits for a call of it in progress to finish.
    void clear_reclaimer() noexcept {
        if (!reclaimer_) {
            return;
        }
        const std::shared_ptr<detail::pb::local_reclaimer> mine = std::move(reclaimer_);
        {
            detail::pb::local_registry& reg = share_.seg().local();
            std::lock_guard lock(reg.mutex);
            std::erase(reg.reclaimers, mine);
        }
        std::lock_guard running(mine->mutex);
        mine->give_back = nullptr;
    }
    /// Asks every other pool of this process registered with this budget to give its spares back
    /// now (pools of other processes are asked by acquire_asking_processes; a refused acquire also
    /// takes back the shares of dead processes). A busy pool is skipped. Returns the bytes given back.
    std::size_t reclaim_from_others() noexcept {
        const detail::pb::local_reclaimer* self = reclaimer_.get();
        return detail::pb::run_local_reclaimers(share_.seg(),
                                                [self](const detail::pb::local_reclaimer& r) { return &r != self; });
    }

    /// Registers `evict` (evicts cached blocks until about the given bytes of its pool's pages
    /// hold nothing, returns the page bytes it emptied; must not throw) as this quota's cache
    /// reclaimer: called for another model of this process refused by the global limit
    /// (reclaim_cached_from_others), and by the watcher for another process's request, after
    /// the spares (serve_requests). One per quota object (a copy has a slot of its own).
    void set_cache_reclaimer(std::function<std::size_t(std::size_t)> evict) {
        clear_cache_reclaimer();
        auto r = std::make_shared<detail::pb::local_cache_reclaimer>();
        r->evict = std::move(evict);
        r->model = share_.model();
        detail::pb::local_registry& reg = share_.seg().local();
        std::lock_guard lock(reg.mutex);
        reg.cache_reclaimers.push_back(r);
        cache_reclaimer_ = std::move(r);
    }
    /// Unregisters this quota's cache reclaimer; waits for a call of it in progress to finish.
    void clear_cache_reclaimer() noexcept {
        if (!cache_reclaimer_) {
            return;
        }
        const std::shared_ptr<detail::pb::local_cache_reclaimer> mine = std::move(cache_reclaimer_);
        {
            detail::pb::local_registry& reg = share_.seg().local();
            std::lock_guard lock(reg.mutex);
            std::erase(reg.cache_reclaimers, mine);
        }
        std::lock_guard running(mine->mutex);
        mine->evict = nullptr;
    }
    /// For a commit of `bytes` this model was refused (after the spare reclaimers made no room):
    /// asks this process's cache reclaimers of other models for the shortfall under the global
    /// limit (other processes' cached blocks come through acquire_asking_processes and their
    /// watchers). Returns the room gained (or found); 0 when this model's own limit refuses or
    /// nothing came back.
    std::size_t reclaim_cached_from_others(std::size_t bytes) noexcept {
        if (::getpid() != share_.who().pid) {
            return 0;
        }
        const std::uint32_t self = share_.model();
        const auto room = [this]() noexcept { return share_.room(); };
        return detail::reclaim_cached_for(bytes, room, [&]() noexcept {
            (void)detail::pb::run_local_cache_reclaimers(
                share_.seg(), bytes, room, [self](const detail::pb::local_cache_reclaimer& r) { return r.model != self; });
        });
    }

    /// The bytes this process holds of this model now.
    [[nodiscard]] std::size_t process_committed() const { return share_.process_committed(); }

    /// The model's name.
    [[nodiscard]] const std::string& name() const noexcept { return share_.name(); }

private:
    friend class process_budget;
    explicit process_quota(std::pair<detail::pb::share, std::shared_ptr<detail::pb::record_hold>> held) noexcept
        : share_(std::move(held.first)), hold_(std::move(held.second)) {}

    void check_process(const char* what) const {
        if (::getpid() != share_.who().pid) {
            throw invalid_argument(std::string(what) + " on the process quota of model '" + share_.name() +
                                   "' in process " + std::to_string(::getpid()) + ", a fork of process " +
                                   std::to_string(share_.who().pid) +
                                   " that registered it: register the model again in this process");
        }
    }

    detail::pb::share share_;
    std::shared_ptr<detail::pb::local_reclaimer> reclaimer_;  // this copy's registration, if any
    std::shared_ptr<detail::pb::local_cache_reclaimer> cache_reclaimer_;  // this copy's cache reclaimer, if any
    std::shared_ptr<detail::pb::record_hold> hold_;  // shared by this process's quotas of the model
};

static_assert(quota_policy<process_quota>, "vmmpp::process_quota must model vmmpp::quota_policy");
static_assert(reclaiming_quota<process_quota>, "vmmpp::process_quota lets a process's pools reclaim each other's spares");
static_assert(cache_reclaiming_quota<process_quota>,
              "vmmpp::process_quota lets models and processes reclaim each other's cached blocks");

/// A global byte limit shared by the pools of several processes, held in the POSIX
/// shared-memory segment `/name` (on Linux, /dev/shm/name). Models register with
/// `register_model`, which returns the quota policy their pool is built with.
///
/// Thread and process safety: every member function may be called at once from any threads of
/// any processes attached to the segment; the static ones too (creation is decided by
/// O_CREAT|O_EXCL). The segment stays mapped in this process while any process_budget or
/// process_quota of it lives here, so destruction order does not matter.
class process_budget {
public:
    /// Creates the segment `name` with a global limit. Throws vmmpp::invalid_argument if it
    /// exists already, or if `options.mode` lets group or others write it without
    /// `options.allow_shared_write`.
    [[nodiscard]] static process_budget create(std::string_view name, std::size_t global_limit,
                                              process_budget_options options = {}) {
        const std::string n = detail::pb::shm_name(name);
        auto s = create_segment(n, global_limit, options, current_process_identity());
        if (!s) {
            throw invalid_argument("process budget '" + n +
                                   "' exists already (remove it, or use open or create_or_open)");
        }
        return process_budget(std::move(s), options);
    }

    /// Attaches the existing segment `name` (`options.attach_timeout`, `trusted_owners` and
    /// `allow_shared_write` are used). Throws vmmpp::untrusted_segment, before reading anything
    /// of it, if another user owns it or group or others may write it (unless the options accept
    /// that); vmmpp::no_such_segment if there is none; vmmpp::incompatible_segment if it is not a
    /// vmmpp process budget of this layout version and ABI (both are invalid_arguments). Takes
    /// back the shares of dead processes.
    [[nodiscard]] static process_budget open(std::string_view name, process_budget_options options = {}) {
        const std::string n = detail::pb::shm_name(name);
        auto s = attach_segment(n, options, current_process_identity());
        if (!s) {
            throw no_such_segment("process budget '" + n + "' does not exist");
        }
        process_budget b(std::move(s), options);
        b.reclaim_dead();
        return b;
    }

    /// Attaches the segment `name`, creating it if there is none. The creator sets the global
    /// limit and the table sizes; an attacher's `global_limit` and table sizes are ignored
    /// (read limit() and created()). An existing segment is checked as `open` checks it: one
    /// that another user made first is refused, not joined.
    [[nodiscard]] static process_budget create_or_open(std::string_view name, std::size_t global_limit,
                                                      process_budget_options options = {}) {
        const std::string n = detail::pb::shm_name(name);
        const process_identity self = current_process_identity();
        for (int attempt = 0; attempt < 100; ++attempt) {
            if (auto s = create_segment(n, global_limit, options, self)) {
                return process_budget(std::move(s), options);
            }
            if (auto s = attach_segment(n, options, self)) {
                process_budget b(std::move(s), options);
                b.reclaim_dead();
                return b;
            }
            // Removed between the two calls: try again.
        }
        throw error("vmmpp process budget '" + n + "': created and removed by others 100 times in a row");
    }

    /// Unlinks the segment `name`: later opens no longer find it, while processes attached now
    /// keep using theirs until they let go. Returns false if there was none. Throws
    /// vmmpp::untrusted_segment if another user owns it (unless `options.trusted_owners` names
    /// that user): removing a segment splits the processes using it, so even root removes only
    /// its own. (The owner is read just before the unlink; /dev/shm is sticky, so only that owner
    /// or root could replace the object in between.)
    static bool remove(std::string_view name, const process_budget_options& options = {}) {
        const std::string n = detail::pb::shm_name(name);
        return detail::pb::unlink_trusted(n, options.trusted_owners, untrusted{n});
    }

    /// Unlinks this handle's segment, if its name still names it: another process may have
    /// removed it and created another under the name since, which stays. Returns whether it
    /// unlinked.
    bool remove() const { return detail::pb::unlink_if_same(segment_->name(), segment_->file()); }

    /// Registers model `name` for this process, which may then commit through the returned
    /// quota. The first registration (by any process) creates the model with `limit`; later
    /// ones, from this or other processes, join it and must state the same limit (the one it was
    /// created with, even after set_model_limit changed the limit in force). The model's
    /// limit bounds the sum over all processes. Names are 1 to 63 bytes. The process is the
    /// calling one: in a child made by fork, registering through the inherited handle gives the
    /// child a record of its own (which no other process asks for spares: the child inherits no
    /// watcher; open the budget again in the child to run one).
    ///
    /// Unloading: when the last process_quota of this process's record goes (the returned quota,
    /// its copies, those pools hold), the record is freed (what it still holds goes back), so
    /// register_model joins or creates afresh. The model itself stays in the table, with its
    /// statistics and any limit an operator set, for other processes and restarts, until
    /// remove_model (or `vmmpp-budget remove`), which succeeds once no live process holds a
    /// quota of it; then the name may be registered with another limit.
    [[nodiscard]] process_quota register_model(std::string_view name, std::size_t limit) {
        return process_quota(
            detail::pb::register_held(segment_, name, limit, segment_->self(), segment_->serving_requests()));
    }

    /// Takes back the bytes of every process that has died without releasing them and frees
    /// their usage records. Returns the bytes taken back.
    std::size_t reclaim_dead() { return detail::pb::reclaim_dead(*segment_); }

    /// Sets the global limit at run time, for every process. Raising it takes effect at once.
    /// Lowering it below what is charged refuses commits above it from then on, gives back this
    /// process's pools' spares at once, and asks the other processes for theirs (it wakes their
    /// watchers; processes without one give them back through honour_limits); what live blocks
    /// hold stays, and the result says how much is still over.
    /// Throws: vmmpp::invalid_argument for a zero limit (nothing changed); vmmpp::error if the
    /// lock cannot be taken.
    limit_change set_limit(std::size_t global_limit) { return detail::pb::set_limit(*segment_, nullptr, global_limit); }

    /// Sets model `name`'s limit at run time, as set_limit does the global one.
    /// Throws: vmmpp::unknown_model for a name not registered, vmmpp::invalid_argument for a zero
    /// limit (nothing changed); vmmpp::error if the lock cannot be taken.
    limit_change set_model_limit(std::string_view name, std::size_t limit) {
        return detail::pb::set_limit(*segment_, &name, limit);
    }

    /// Where model `name` (or, without one, the budget) stands against its limit now: applied
    /// when what is charged fits, pending with the bytes over otherwise (`reclaimed` is 0).
    /// Throws: vmmpp::unknown_model; vmmpp::error if the lock cannot be taken.
    [[nodiscard]] limit_change limit_status(std::string_view name = {}) const {
        const process_budget_stats s = stats();
        if (name.empty()) {
            return detail::make_limit_change(s.limit, s.limit, s.committed, 0);
        }
        for (const auto& m : s.models) {
            if (m.name == name) {
                return detail::make_limit_change(m.limit, m.limit, m.committed, 0);
            }
        }
        throw unknown_model("process budget '" + segment_->name() + "' has no model '" + std::string(name) + "'");
    }

    /// Removes model `name` from the table (after taking back the shares of dead processes).
    /// Returns false if there was none.
    /// Throws: vmmpp::model_in_use while live processes still hold a share of it (nothing
    /// changed); vmmpp::error if the lock cannot be taken.
    bool remove_model(std::string_view name) { return detail::pb::remove_model(*segment_, name); }

    /// Gives back the spares of this process's pools of every model whose limit another process
    /// lowered below what was charged since this process last looked. Cheap when nothing
    /// changed (one lock of the segment). Returns the bytes given back.
    std::size_t honour_limits() noexcept { return detail::pb::honour_limits(*segment_); }

    /// A consistent snapshot of the budget, every model and every usage record.
    [[nodiscard]] process_budget_stats stats() const {
        process_budget_stats s;
        const detail::pb::segment& seg = *segment_;
        std::lock_guard lock(seg.mutex());
        const detail::pb::header& h = seg.head();
        const detail::pb::model_slot* m = seg.models();
        const detail::pb::record_slot* r = seg.records();
        s.limit = h.limit;
        s.committed = h.committed;
        s.peak = h.peak;
        s.denied = h.denied;
        s.reclaimed = h.reclaimed_bytes;
        s.reclaimed_records = h.reclaimed_records;
        s.repairs = h.repairs;
        s.reclaim_requests = h.requests;
        s.request_grants = h.request_grants;
        s.request_reclaimed = h.request_reclaimed;
        s.max_models = seg.max_models();
        s.max_records = seg.max_records();
        for (std::uint32_t i = 0; i < seg.max_models(); ++i) {
            if (m[i].name[0] != '\0') {
                s.models.push_back(detail::pb::stats_of_locked(seg, i));
            }
        }
        for (std::uint32_t i = 0; i < seg.max_records(); ++i) {
            if (const detail::pb::model_slot* owner = seg.model_of(r[i]); r[i].pid != 0 && owner != nullptr) {
                s.usage.push_back(process_usage{std::string(detail::pb::slot_name(*owner)),
                                                detail::pb::identity_of(r[i]), r[i].bytes});
            }
        }
        return s;
    }

    /// The global limit now (set by the creator, changed by set_limit).
    [[nodiscard]] std::size_t limit() const noexcept { return detail::pb::read_once(segment_->head().limit); }
    /// The segment's name, as shm_open sees it ("/name").
    [[nodiscard]] const std::string& name() const noexcept { return segment_->name(); }
    /// Whether this handle created the segment (false: it attached to an existing one).
    [[nodiscard]] bool created() const noexcept { return segment_->created(); }

private:
    process_budget(std::shared_ptr<detail::pb::segment> s, const process_budget_options& o) : segment_(std::move(s)) {
        segment_->set_request_wait(o.reclaim_wait);
        if (o.reclaim_watch || o.limit_watch.count() > 0) {
            const detail::pb::segment* seg = segment_.get();  // the watcher lives inside it
            const bool serve = o.reclaim_watch;
            segment_->start_watcher(o.limit_watch, serve, [seg, serve] {
                (void)detail::pb::honour_limits(*seg);
                if (serve) {
                    (void)detail::pb::serve_requests(*seg);
                }
            });
        }
    }

    /// How the detail layer reports a segment these options do not let this process use.
    struct untrusted {
        const std::string& name;
        untrusted_segment operator()(const detail::pb::trust_refusal& r) const {
            return untrusted_segment(name, r.owner, r.self, r.mode, r.why);
        }
    };

    static std::shared_ptr<detail::pb::segment> create_segment(const std::string& n, std::size_t global_limit,
                                                               const process_budget_options& o,
                                                               const process_identity& self) {
        return detail::pb::create(n, global_limit, {o.mode, o.max_models, o.max_records, o.allow_shared_write}, self);
    }

    static std::shared_ptr<detail::pb::segment> attach_segment(const std::string& n, const process_budget_options& o,
                                                               const process_identity& self) {
        return detail::pb::attach(n, {o.trusted_owners, o.allow_shared_write}, o.attach_timeout, self, untrusted{n});
    }

    std::shared_ptr<detail::pb::segment> segment_;
};

} // namespace vmmpp
