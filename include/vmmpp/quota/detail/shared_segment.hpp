// vmmpp/quota/detail/shared_segment.hpp: this process's mapping of a process budget's POSIX
// shared-memory segment. Creates a segment (exact mode, zero-filled tables, the robust mutex,
// `magic` published last), attaches one (owner and mode checked before a byte of it is read, the
// header validated once, the object's size checked before it is mapped whole), and unlinks one.
// The `segment` object keeps the layout it validated, holds the lock's handle and repairs the
// totals when a process died holding the lock. Linux only.
#pragma once

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <ctime>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "vmmpp/detail/unique_fd.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/robust_mutex.hpp"

namespace vmmpp::detail::pb {

/// strerror as a std::string.
/// Throws: std::bad_alloc.
inline std::string errno_text(int err) { return std::strerror(err); }

/// An owned shared mapping (mmap with MAP_SHARED), unmapped when its owner goes. Move-only.
/// Thread safety: like a pointer; the mapped bytes are the caller's to guard.
class shared_mapping {
public:
    /// Maps nothing.
    shared_mapping() noexcept = default;
    /// Maps `bytes` of `fd` from offset 0 with protection `prot`; maps nothing (errno set) if
    /// mmap fails.
    /// Throws: nothing.
    shared_mapping(int fd, std::size_t bytes, int prot) noexcept {
        if (void* p = ::mmap(nullptr, bytes, prot, MAP_SHARED, fd, 0); p != MAP_FAILED) {
            base_ = p;
            bytes_ = bytes;
        }
    }
    /// Takes `other`'s mapping; `other` maps nothing.
    shared_mapping(shared_mapping&& other) noexcept
        : base_(std::exchange(other.base_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
    /// Unmaps what is mapped here, then takes `other`'s mapping.
    shared_mapping& operator=(shared_mapping&& other) noexcept {
        if (this != &other) {
            reset();
            base_ = std::exchange(other.base_, nullptr);
            bytes_ = std::exchange(other.bytes_, 0);
        }
        return *this;
    }
    shared_mapping(const shared_mapping&) = delete;
    shared_mapping& operator=(const shared_mapping&) = delete;
    ~shared_mapping() { reset(); }

    /// The first mapped byte; nullptr if nothing is mapped.
    [[nodiscard]] void* get() const noexcept { return base_; }
    /// Whether something is mapped.
    explicit operator bool() const noexcept { return base_ != nullptr; }
    /// Unmaps (if anything is mapped). Leaves errno as it was.
    /// Throws: nothing.
    void reset() noexcept {
        if (base_ != nullptr) {
            const int saved = errno;
            ::munmap(base_, bytes_);
            errno = saved;
            base_ = nullptr;
            bytes_ = 0;
        }
    }

private:
    void* base_ = nullptr;
    std::size_t bytes_ = 0;
};

/// Wakes every thread, of any process, sleeping in futex_wait on `word` (a word of the shared
/// mapping: no FUTEX_PRIVATE_FLAG, so the kernel keys it by the shared page, not the process).
/// Throws: nothing.
inline void futex_wake_all(std::atomic<std::uint32_t>& word) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

/// A futex_wait timeout that means no limit.
inline constexpr std::chrono::nanoseconds no_timeout = std::chrono::nanoseconds::max();

/// Sleeps while `word` still holds `seen`, until futex_wake_all on it, a signal, or `timeout`
/// (no_timeout: no limit). Returns at once if `word` changed already, so a change made after
/// `seen` was read is never slept through. Callers re-check what they wait for: wake-ups may be
/// spurious. (A plain duration, not an optional: GCC 12 at -O2 warns maybe-uninitialized on one.)
/// Throws: nothing.
inline void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t seen, std::chrono::nanoseconds timeout) noexcept {
    const bool limited = timeout != no_timeout;
    const auto ns = std::max<std::chrono::nanoseconds::rep>(timeout.count(), 0);
    timespec ts{};
    ts.tv_sec = static_cast<std::time_t>(ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT, seen, limited ? &ts : nullptr, nullptr, 0);
}

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

class record_hold;  // budget_share.hpp

/// This process's reclaimers of one segment, the limit generations it has acted on, and its
/// holds on usage records.
struct local_registry {
    std::mutex mutex;
    std::vector<std::shared_ptr<local_reclaimer>> reclaimers;
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
    ~segment() {
        if (!watcher_.joinable()) {
            return;
        }
        if (watcher_pid_ != ::getpid()) {
            watcher_.detach();
            return;
        }
        // Stop first, then change the word: the watcher either sees the stop before it sleeps or
        // finds the word changed and does not sleep (or is woken). Other processes' watchers
        // wake once too, find nothing asked and sleep again.
        watcher_stop_.store(true);
        head().wake_word.fetch_add(1);
        futex_wake_all(head().wake_word);
        watcher_.join();
    }

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
        if (watcher_.joinable()) {
            return;
        }
        watcher_ = std::thread([this, every, tick = std::move(tick)] {
            const std::chrono::nanoseconds timeout = every.count() > 0 ? std::chrono::nanoseconds(every) : no_timeout;
            for (;;) {
                // Read the word before acting: a change made while `tick` runs makes the wait
                // return at once.
                const std::uint32_t seen = head().wake_word.load();
                if (watcher_stop_.load()) {
                    return;
                }
                tick();
                futex_wait(head().wake_word, seen, timeout);
            }
        });
        watcher_pid_ = ::getpid();
        serves_requests_ = serves_requests;
    }

    /// Whether a watcher of this segment object runs in the calling process and answers other
    /// processes' reclaim requests (false in a forked child, which inherits no thread).
    [[nodiscard]] bool serving_requests() const {
        std::lock_guard lock(local_.mutex);
        return serves_requests_ && watcher_.joinable() && watcher_pid_ == ::getpid();
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
    mutable std::atomic<bool> watcher_stop_{false};
    mutable pid_t watcher_pid_ = 0;         // the process that started watcher_ (fork: not the child)
    mutable bool serves_requests_ = false;
    mutable std::thread watcher_;  // stopped and joined by the destructor, before any member goes
};

inline void segment::repair_hook::operator()() const noexcept {
    owner->repair();
    ++owner->head().repairs;
}

/// "/name": the form shm_open wants.
/// Throws: vmmpp::invalid_argument for a name it refuses (empty, over 254 characters, a '/'
/// after the first character, a NUL).
inline std::string shm_name(std::string_view name) {
    std::string n(name);
    if (n.empty() || n[0] != '/') {
        n.insert(n.begin(), '/');
    }
    if (n.size() < 2 || n.size() > 255 || n.find('/', 1) != std::string::npos ||
        n.find('\0') != std::string::npos) {
        throw invalid_argument("process budget name '" + std::string(name) +
                               "' must be 1 to 254 characters without '/' (a leading '/' is allowed)");
    }
    return n;
}

/// Whose segments this process uses: its effective uid's, and `trusted_owners`'; with
/// `allow_shared_write`, also those that group or others may write.
struct trust_policy {
    std::span<const uid_t> trusted_owners;
    bool allow_shared_write = false;
};

/// Why an object may not be trusted: its owner and mode, this process's effective uid, and a
/// phrase ("is owned by another user").
struct trust_refusal {
    uid_t owner = 0;
    uid_t self = 0;
    mode_t mode = 0;
    const char* why = "";
};

/// A refusal unless the object `st` describes is owned by this process's effective uid or by one
/// of `trusted_owners`.
/// Throws: nothing.
inline std::optional<trust_refusal> owner_refusal(const struct stat& st, std::span<const uid_t> trusted_owners) noexcept {
    const uid_t self = ::geteuid();
    if (st.st_uid != self && std::find(trusted_owners.begin(), trusted_owners.end(), st.st_uid) == trusted_owners.end()) {
        return trust_refusal{st.st_uid, self, st.st_mode, "is owned by another user"};
    }
    return std::nullopt;
}

/// A refusal unless the object `st` describes passes every check of trust: an accepted owner, and
/// no write permission for group or others unless the policy allows it.
/// Throws: vmmpp::invalid_argument if it is not a regular object.
inline std::optional<trust_refusal> trust_refusal_of(const std::string& name, const struct stat& st,
                                                     const trust_policy& policy) {
    if (!S_ISREG(st.st_mode)) {
        throw incompatible_segment("shared memory object '" + name + "' is not a regular object");
    }
    if (auto refusal = owner_refusal(st, policy.trusted_owners)) {
        return refusal;
    }
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && !policy.allow_shared_write) {
        return trust_refusal{st.st_uid, ::geteuid(), st.st_mode, "may be written by its group or others"};
    }
    return std::nullopt;
}

/// What a segment is created with (the creator's process_budget_options).
struct create_params {
    mode_t mode = 0600;
    std::uint32_t max_models = 0;
    std::uint32_t max_records = 0;
    bool allow_shared_write = false;
};

/// Creates and initialises the segment `name` (a shm_name) with global limit `limit`, made by
/// `self`; nullptr if it exists already. The object gets exactly `p.mode` (whatever the umask);
/// `magic` is stored last, with release, so an attacher sees a whole header or waits.
/// Throws: vmmpp::invalid_argument for a zero limit or table size, a mode beyond 0777, or one
/// that lets group or others write without `p.allow_shared_write`; vmmpp::error if a system call
/// fails (the name is unlinked again).
/// Thread safety: any threads of any processes at once (O_CREAT | O_EXCL decides who creates).
inline std::shared_ptr<segment> create(const std::string& name, std::size_t limit, const create_params& p,
                                       const process_identity& self) {
    if (limit == 0) {
        throw invalid_argument("process budget '" + name + "': the global limit must not be zero");
    }
    if (p.max_models == 0 || p.max_records == 0) {
        throw invalid_argument("process budget '" + name + "': max_models and max_records must not be zero");
    }
    if ((p.mode & ~mode_t{0777}) != 0) {
        throw invalid_argument("process budget '" + name + "': mode must be permission bits (at most 0777)");
    }
    if ((p.mode & (S_IWGRP | S_IWOTH)) != 0 && !p.allow_shared_write) {
        char mode[16];
        std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(p.mode));
        throw invalid_argument("process budget '" + name + "': mode " + mode +
                               " lets group or others write the segment, and whoever writes it controls every "
                               "process attached: set process_budget_options::allow_shared_write to make it anyway");
    }
    const layout l = layout_of(p.max_models, p.max_records);
    const unique_fd fd(::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, p.mode));
    if (!fd) {
        if (errno == EEXIST) {
            return nullptr;
        }
        throw error("vmmpp process budget '" + name + "': shm_open(O_CREAT) failed: " + errno_text(errno));
    }
    auto fail = [&](const char* call, int err) -> error {
        ::shm_unlink(name.c_str());
        return error("vmmpp process budget '" + name + "': " + call + " failed: " + errno_text(err));
    };
    if (::fchmod(fd.get(), p.mode) != 0) {  // shm_open's mode went through the umask
        throw fail("fchmod", errno);
    }
    if (::ftruncate(fd.get(), static_cast<off_t>(l.total_bytes)) != 0) {
        throw fail("ftruncate", errno);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
        throw fail("fstat", errno);
    }
    shared_mapping mapping(fd.get(), l.total_bytes, PROT_READ | PROT_WRITE);
    if (!mapping) {
        throw fail("mmap", errno);
    }
    // The file is zero-filled: every model and record slot is free already.
    header* h = write_header(mapping.get(), l, limit, self);
    if (const int rc = init_robust_mutex(h->mutex); rc != 0) {
        throw fail("pthread_mutex_init (process-shared, robust)", rc);
    }
    h->magic.store(magic, std::memory_order_release);  // published: attachers may use it now
    return std::make_shared<segment>(name, std::move(mapping), l, file_of(st), self, true);
}

/// Attaches the segment `name` (a shm_name) as `self`; nullptr if there is none. Checks, in
/// order: that the object may be trusted under `trust` (owner and mode, before anything of it is
/// read); waits up to `timeout` for a creator that is still initialising it (mapping its header
/// alone); validates the header (validate_header); checks the object's size against the layout
/// before mapping it whole. The layout it checked is the one the segment object keeps; nothing
/// stays mapped when it throws.
/// `refuse(const trust_refusal&)` returns the exception to throw for an object that may not be
/// trusted (the public layer's vmmpp::untrusted_segment).
/// Throws: what `refuse` returns; vmmpp::invalid_argument for an object that is not a vmmpp
/// process budget of this layout and ABI, or not initialised within `timeout`; vmmpp::error if a
/// system call fails.
/// Thread safety: any threads of any processes at once.
template <class Refuse>
std::shared_ptr<segment> attach(const std::string& name, const trust_policy& trust, std::chrono::milliseconds timeout,
                                const process_identity& self, Refuse&& refuse) {
    const unique_fd fd(::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0));
    if (!fd) {
        const int err = errno;
        if (err == ENOENT) {
            return nullptr;
        }
        throw error("vmmpp process budget '" + name + "': shm_open failed: " + errno_text(err) +
                    (err == EACCES ? " (its mode does not let this user attach)" : ""));
    }
    struct stat st {};
    auto fstat_now = [&] {
        if (::fstat(fd.get(), &st) != 0) {
            throw error("vmmpp process budget '" + name + "': fstat failed: " + errno_text(errno));
        }
    };
    fstat_now();
    if (const auto refusal = trust_refusal_of(name, st, trust)) {
        throw refuse(*refusal);
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    shared_mapping head_map;
    std::uint64_t seen_magic = 0;
    for (;;) {
        if (!head_map) {
            fstat_now();
            if (static_cast<std::size_t>(st.st_size) >= sizeof(header)) {
                head_map = shared_mapping(fd.get(), sizeof(header), PROT_READ);
                if (!head_map) {
                    throw error("vmmpp process budget '" + name + "': mmap failed: " + errno_text(errno));
                }
            }
        }
        if (head_map) {
            seen_magic = static_cast<const header*>(head_map.get())->magic.load(std::memory_order_acquire);
            if (seen_magic != 0) {
                break;
            }
        }
        if (std::chrono::steady_clock::now() >= deadline) {
            throw incompatible_segment("shared memory object '" + name + "' is not an initialised vmmpp process budget "
                                   "after " + std::to_string(timeout.count()) + " ms (its creator died "
                                   "while creating it, or it is something else): remove it with "
                                   "vmmpp::process_budget::remove");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const layout l = validate_header(name, *static_cast<const header*>(head_map.get()), seen_magic);
    head_map.reset();
    // The object must hold the whole layout before it is mapped: a shorter one would fault (SIGBUS)
    // on the first access past its end. (A writer shrinking it later still can.)
    fstat_now();
    if (static_cast<std::uint64_t>(st.st_size) != l.total_bytes) {
        throw incompatible_segment("shared memory object '" + name + "' is " + std::to_string(st.st_size) +
                               " bytes long, but its layout needs " + std::to_string(l.total_bytes));
    }
    shared_mapping mapping(fd.get(), l.total_bytes, PROT_READ | PROT_WRITE);
    if (!mapping) {
        throw error("vmmpp process budget '" + name + "': mmap failed: " + errno_text(errno));
    }
    return std::make_shared<segment>(name, std::move(mapping), l, file_of(st), self, false);
}

/// shm_unlink of `name`. Returns false if there was none.
/// Throws: vmmpp::error if shm_unlink fails otherwise.
inline bool unlink(const std::string& name) {
    if (::shm_unlink(name.c_str()) == 0) {
        return true;
    }
    if (errno == ENOENT) {
        return false;
    }
    throw error("vmmpp process budget '" + name + "': shm_unlink failed: " + errno_text(errno));
}

/// Unlinks the segment `name` if its owner is this process's effective uid or one of
/// `trusted_owners`. Returns false if there was none. (The owner is read just before the unlink;
/// /dev/shm is sticky, so only that owner or root could replace the object in between. When the
/// object cannot be opened for reading, EACCES, this process is not root and the sticky bit lets
/// the kernel refuse to unlink another user's object.)
/// `refuse(const trust_refusal&)` returns the exception to throw for another user's object.
/// Throws: what `refuse` returns; vmmpp::error if a system call fails.
template <class Refuse>
bool unlink_trusted(const std::string& name, std::span<const uid_t> trusted_owners, Refuse&& refuse) {
    if (const unique_fd fd(::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0)); fd) {
        struct stat st {};
        if (::fstat(fd.get(), &st) != 0) {
            throw error("vmmpp process budget '" + name + "': fstat failed: " + errno_text(errno));
        }
        if (const auto refusal = owner_refusal(st, trusted_owners)) {
            throw refuse(*refusal);
        }
    } else if (errno == ENOENT) {
        return false;
    } else if (errno != EACCES) {
        throw error("vmmpp process budget '" + name + "': shm_open failed: " + errno_text(errno));
    }
    return unlink(name);
}

/// Unlinks the segment `name` if the name still names the object `file`: another process may
/// have removed it and created another under the name since, which stays. Returns whether it
/// unlinked.
/// Throws: vmmpp::error if a system call fails.
inline bool unlink_if_same(const std::string& name, const file_id& file) {
    const unique_fd fd(::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0));
    if (!fd) {
        if (errno == ENOENT) {
            return false;
        }
        throw error("vmmpp process budget '" + name + "': shm_open failed: " + errno_text(errno));
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
        throw error("vmmpp process budget '" + name + "': fstat failed: " + errno_text(errno));
    }
    if (file_of(st) != file) {
        return false;  // another segment under the same name
    }
    return unlink(name);
}

} // namespace vmmpp::detail::pb
