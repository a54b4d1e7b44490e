// vmmpp/quota/detail/shared_segment.hpp: this process's mapping of a process budget's segment.
//
// The `segment` object keeps the layout it validated, holds the lock's handle, repairs the totals
// when a process died holding the lock, and owns this process's reclaimers and watcher. Creating
// and attaching one: segment_open.hpp. Linux only.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/futex_watcher.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/robust_mutex.hpp"
#include "vmmpp/quota/detail/shared_mapping.hpp"

namespace vmmpp::detail::pb {

/// Which object a name named when this process opened it (device and inode).
struct file_id {
    std::uint64_t dev = 0;
    std::uint64_t ino = 0;
    friend bool operator==(const file_id&, const file_id&) = default;
};

/// The object `st` describes.
/// Throws: nothing.
inline file_id file_of(const struct stat& st) noexcept {
    return {static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}

/// A pool of this process that gives its spares back on request: registered through a
/// process_quota (set_reclaimer), called under budget pressure and when a limit is lowered.
struct local_reclaimer {
    std::mutex mutex;  // held while `give_back` runs, so unregistering waits for a running call
    std::function<std::size_t()> give_back;
    std::uint32_t model = 0;
};

/// A cache of this process whose evictable blocks other models and processes may take when
/// their commits are refused: registered through a process_quota (set_cache_reclaimer).
struct local_cache_reclaimer {
    std::mutex mutex;  // held while `evict` runs, so unregistering waits for a running call
    std::function<std::size_t(std::size_t)> evict;
    std::uint32_t model = 0;
};

class record_hold;  // share_registration.hpp

/// This process's reclaimers of one segment, the limit generations it has acted on, and its
/// holds on usage records.
struct local_registry {
    std::mutex mutex;
    std::vector<std::shared_ptr<local_reclaimer>> reclaimers;
    std::vector<std::shared_ptr<local_cache_reclaimer>> cache_reclaimers;
    std::vector<std::uint64_t> seen_model_generation;  // by model slot; grown on first use
    std::uint64_t seen_global_generation = 0;
    /// Guards `holds` and orders a record's registration against its last quota freeing it.
    /// Taken before the segment's lock, never inside it.
    std::mutex holds_mutex;
    std::vector<std::weak_ptr<record_hold>> holds;  // by record slot; grown on first use
};

/// This process's mapping of one segment. Owned through shared_ptr by every process_budget and
/// process_quota of this process that uses it; unmapped when the last one goes. Its layout is
/// this process's copy (see `layout`), and every record's model index is checked against it.
///
/// Thread safety: the accessors may be called by any threads at once; the tables they return are
/// read and written only with mutex() held (by any thread of any process attached).
class segment {
    /// The lock's repair hook: rebuilds the totals (repair()) and counts the repair.
    struct repair_hook {
        const segment* owner;
        void operator()() const noexcept;
    };

public:
    /// The lock's type: Lockable (std::lock_guard, std::unique_lock); it repairs when it finds
    /// that the last owner died.
    using mutex_type = robust_mutex<repair_hook>;

    /// Takes over `mapping`, a whole segment laid out as `l` (validated or made by this process).
    /// Throws: std::bad_alloc.
    segment(std::string name, shared_mapping mapping, layout l, file_id file, process_identity self, bool created)
        : name_(std::move(name)), mapping_(std::move(mapping)), layout_(l), file_(file), self_(self),
          created_(created), mutex_(head().mutex, repair_hook{this}, "vmmpp process budget '" + name_ + "'") {}
    segment(const segment&) = delete;
    segment& operator=(const segment&) = delete;
    /// Stops and joins the watcher, if this process started one (a forked child's copy of the
    /// handle names a thread that lives in the parent only: it is left alone).
    ~segment() { watcher_.stop(); }

    /// This process's reclaimers and the limit generations it has acted on.
    [[nodiscard]] local_registry& local() const noexcept { return local_; }

    /// Starts this process's watcher (once per segment object; later calls do nothing): a thread
    /// that sleeps on the header's wake_word (FUTEX_WAIT, no CPU while nothing happens) and calls
    /// `tick` whenever the word changes (a reclaim request, a lowered limit, a shutdown), and
    /// also every `every` if that is not zero (the limit_watch fallback). `serves_requests` is
    /// what serving_requests() reports to register_share: whether `tick` answers requests.
    /// Throws: std::system_error if no thread can be started.
    void start_watcher(std::chrono::milliseconds every, bool serves_requests, std::function<void()> tick) const {
        std::lock_guard lock(local_.mutex);
        if (watcher_.start(head().wake_word, every, std::move(tick))) {
            serves_requests_ = serves_requests;
        }
    }

    /// Whether a watcher of this segment object runs in the calling process and answers other
    /// processes' reclaim requests (false in a forked child, which inherits no thread).
    [[nodiscard]] bool serving_requests() const {
        std::lock_guard lock(local_.mutex);
        return serves_requests_ && watcher_.running_here();
    }

    /// How long an acquire refused by a limit waits for other processes' watchers to give back
    /// (process_budget_options::reclaim_wait; zero: it asks no one).
    [[nodiscard]] std::chrono::milliseconds request_wait() const noexcept { return request_wait_; }
    /// Sets request_wait() (by the process_budget that made this object, before sharing it).
    void set_request_wait(std::chrono::milliseconds wait) noexcept { request_wait_ = wait; }

    /// The name, as shm_open sees it ("/name").
    [[nodiscard]] const std::string& name() const noexcept { return name_; }
    /// Whether this process created the segment (false: it attached).
    [[nodiscard]] bool created() const noexcept { return created_; }
    /// The object this process mapped, as it was named then.
    [[nodiscard]] const file_id& file() const noexcept { return file_; }
    /// The calling process: the identity taken when this process attached, or, in a child made
    /// by fork since, the child's own (read at the call, so the child gets records of its own).
    /// Throws: vmmpp::error if /proc cannot be read (in a forked child only).
    [[nodiscard]] process_identity self() const {
        return ::getpid() == self_.pid ? self_ : current_process_identity();
    }
    /// The segment's lock, shared by every process attached. Lock it before reading or writing
    /// the header's totals or the tables.
    [[nodiscard]] mutex_type& mutex() const noexcept { return mutex_; }
    /// The header.
    [[nodiscard]] header& head() const noexcept { return *static_cast<header*>(mapping_.get()); }
    /// The model table (max_models() slots).
    [[nodiscard]] model_slot* models() const noexcept {
        return reinterpret_cast<model_slot*>(static_cast<std::byte*>(mapping_.get()) + layout_.models_offset);
    }
    /// The record table (max_records() slots).
    [[nodiscard]] record_slot* records() const noexcept {
        return reinterpret_cast<record_slot*>(static_cast<std::byte*>(mapping_.get()) + layout_.records_offset);
    }
    /// Model slots, as this process validated them.
    [[nodiscard]] std::uint32_t max_models() const noexcept { return layout_.max_models; }
    /// Record slots, as this process validated them.
    [[nodiscard]] std::uint32_t max_records() const noexcept { return layout_.max_records; }
    /// The model slot a record points at, or nullptr when its index lies outside the table.
    [[nodiscard]] model_slot* model_of(const record_slot& r) const noexcept {
        const std::uint64_t i = r.model;  // one read: the check and the use see the same index
        return i < layout_.max_models ? models() + i : nullptr;
    }

    /// Rebuilds every total from the usage records, the one source of truth: a process killed
    /// half way through an update leaves a record consistent (one aligned store) but the totals
    /// after it behind. Frees records that point at no model. Called with the lock held (by the
    /// lock itself, when it finds that its last owner died).
    /// Throws: nothing.
    void repair() const noexcept {
        header& h = head();
        model_slot* m = models();
        record_slot* r = records();
        for (std::uint32_t i = 0; i < max_models(); ++i) {
            m[i].name[name_capacity - 1] = '\0';
            m[i].committed = 0;
        }
        for (std::uint32_t i = 0; i < max_records(); ++i) {
            if (r[i].pid == 0) {
                continue;
            }
            model_slot* owner = model_of(r[i]);
            if (owner == nullptr || owner->name[0] == '\0') {
                r[i].pid = 0;
                continue;
            }
            owner->committed += r[i].bytes;
        }
        std::uint64_t total = 0;
        for (std::uint32_t i = 0; i < max_models(); ++i) {
            m[i].peak = std::max(m[i].peak, m[i].committed);
            total += m[i].committed;
        }
        h.committed = total;
        h.peak = std::max(h.peak, total);
    }

private:
    std::string name_;
    shared_mapping mapping_;
    layout layout_;
    file_id file_;
    process_identity self_;
    bool created_;
    mutable mutex_type mutex_;  // refers to the mapping
    mutable local_registry local_;
    std::chrono::milliseconds request_wait_{0};
    mutable bool serves_requests_ = false;
    mutable futex_watcher watcher_;  // stopped and joined by the destructor, before any member goes
};

inline void segment::repair_hook::operator()() const noexcept {
    owner->repair();
    ++owner->head().repairs;
}

} // namespace vmmpp::detail::pb
