// vmmpp/quota/process_budget.hpp: one memory budget shared by the pools of several *processes*
// on a GPU. It works like vmmpp::budget / vmmpp::shared_budget (a global byte limit, per-model
// limits, statistics), but its state lives in a named POSIX shared-memory segment, guarded by a
// process-shared robust mutex, and a process that dies without releasing gives its share back.
// Linux only (it reads /proc). docs/MULTIPROCESS.md describes the design, and what a segment's
// owner and mode must be for a process to attach it (no other user may write it).
#pragma once

#if !defined(__linux__)
#error "vmmpp/quota/process_budget.hpp needs Linux: it reads /proc and uses robust process-shared mutexes"
#endif

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/concept.hpp"
#include "vmmpp/quota/shared_budget.hpp"  // model_stats, budget_stats

namespace vmmpp {

/// A process image, told apart from a later process that reuses its pid (the pid and the start
/// time the kernel reports in /proc/<pid>/stat, field 22, clock ticks after boot) and from the
/// image it replaces or is replaced by with exec, which keeps both (`image`, a tag that every exec
/// draws anew; 0: unknown).
struct process_identity {
    pid_t pid = 0;
    std::uint64_t start_time = 0;
    std::uint64_t image = 0;
    friend bool operator==(const process_identity&, const process_identity&) = default;
};

class process_budget;
class process_quota;

namespace detail {

/// Tests reach into a process budget through this; it is defined by tests only.
struct process_budget_access;

namespace proc {

/// Reads at most `capacity - 1` bytes of a small file (a /proc entry) and NUL-terminates them.
/// Returns the length, or -1 with errno set.
inline long read_small_file(const char* path, char* buffer, std::size_t capacity) noexcept {
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    std::size_t length = 0;
    while (length + 1 < capacity) {
        const ssize_t n = ::read(fd, buffer + length, capacity - 1 - length);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            const int err = errno;
            ::close(fd);
            errno = err;
            return -1;
        }
        if (n == 0) {
            break;
        }
        length += static_cast<std::size_t>(n);
    }
    ::close(fd);
    buffer[length] = '\0';
    return static_cast<long>(length);
}

/// What vmmpp needs of /proc/<pid>/stat: field 3 (state) and field 22 (start time).
struct stat_fields {
    char state = '?';
    std::uint64_t start_time = 0;
};

/// Parses the text of /proc/<pid>/stat. Field 2 (the command name, in parentheses) may hold
/// spaces and parentheses itself, so fields are counted from the last ')'.
inline std::optional<stat_fields> parse_stat(std::string_view text) noexcept {
    const std::size_t close = text.rfind(')');
    if (close == std::string_view::npos) {
        return std::nullopt;
    }
    std::string_view rest = text.substr(close + 1);
    stat_fields fields;
    for (int field = 3; field <= 22; ++field) {
        const std::size_t begin = rest.find_first_not_of(' ');
        if (begin == std::string_view::npos) {
            return std::nullopt;
        }
        rest.remove_prefix(begin);
        std::size_t end = rest.find(' ');
        if (end == std::string_view::npos) {
            end = rest.size();
        }
        const std::string_view token = rest.substr(0, end);
        if (field == 3) {
            fields.state = token.empty() ? '?' : token[0];
        } else if (field == 22) {
            const auto [ptr, ec] = std::from_chars(token.data(), token.data() + token.size(), fields.start_time);
            if (ec != std::errc{} || ptr != token.data() + token.size()) {
                return std::nullopt;
            }
        }
        rest.remove_prefix(end);
    }
    return fields;
}

/// /proc/<pid>/stat of a process, or nullopt with errno set (ENOENT: no such process).
inline std::optional<stat_fields> read_stat(pid_t pid) noexcept {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
    char text[1024];
    if (read_small_file(path, text, sizeof text) < 0) {
        return std::nullopt;
    }
    auto fields = parse_stat(text);
    if (!fields) {
        errno = EINVAL;
    }
    return fields;
}

/// The "Threads:" line of /proc/<pid>/status, or -1 when it cannot be read.
inline long thread_count(pid_t pid) noexcept {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/status", static_cast<int>(pid));
    char text[4096];
    if (read_small_file(path, text, sizeof text) < 0) {
        return -1;
    }
    const char* line = std::strstr(text, "\nThreads:");
    if (line == nullptr) {
        return -1;
    }
    return std::strtol(line + 9, nullptr, 10);
}

/// SipHash-2-4 of one 64-bit word under a 128-bit key: a keyed pseudo-random function, whose
/// value tells nothing about the key.
inline std::uint64_t siphash24(const unsigned char* key, std::uint64_t word) noexcept {
    std::uint64_t k0 = 0;
    std::uint64_t k1 = 0;
    std::memcpy(&k0, key, 8);
    std::memcpy(&k1, key + 8, 8);
    std::uint64_t v0 = k0 ^ 0x736f6d6570736575ull;
    std::uint64_t v1 = k1 ^ 0x646f72616e646f6dull;
    std::uint64_t v2 = k0 ^ 0x6c7967656e657261ull;
    std::uint64_t v3 = k1 ^ 0x7465646279746573ull;
    auto rounds = [&](int n) {
        for (int i = 0; i < n; ++i) {
            v0 += v1;
            v1 = std::rotl(v1, 13) ^ v0;
            v0 = std::rotl(v0, 32);
            v2 += v3;
            v3 = std::rotl(v3, 16) ^ v2;
            v0 += v3;
            v3 = std::rotl(v3, 21) ^ v0;
            v2 += v1;
            v1 = std::rotl(v1, 17) ^ v2;
            v2 = std::rotl(v2, 32);
        }
    };
    const std::uint64_t last = std::uint64_t{8} << 56;  // the message length (8) in the final block
    for (const std::uint64_t m : {word, last}) {
        v3 ^= m;
        rounds(2);
        v0 ^= m;
    }
    v2 ^= 0xff;
    rounds(4);
    return v0 ^ v1 ^ v2 ^ v3;
}

/// A tag of the running process image: drawn anew by every exec, inherited by fork (whose child
/// has another pid anyway), and the same in every copy of vmmpp linked into the process.
///
/// It is derived from the 16 random bytes the kernel puts in every new image (AT_RANDOM), not from
/// a random number of vmmpp's own: a library with hidden symbols holds its own copy of every
/// vmmpp static, and two copies with two tags would take each other's records for those of an
/// image exec replaced. The bytes also seed glibc's stack protector, so they are not stored: the
/// tag is a keyed hash of a constant under them, which tells nothing about them.
inline std::uint64_t image_tag() noexcept {
    static const std::uint64_t tag = [] {
        std::uint64_t t = 0;
        if (const auto at_random = ::getauxval(AT_RANDOM); at_random != 0) {
            t = siphash24(reinterpret_cast<const unsigned char*>(at_random), 0x6567616d69707076ull);  // "vppimage"
        } else {
            std::random_device device;  // no auxiliary vector entry (not seen on Linux >= 2.6.29)
            t = (std::uint64_t{device()} << 32) ^ device();
        }
        return t != 0 ? t : 1;  // 0 means "unknown"
    }();
    return tag;
}

} // namespace proc
} // namespace detail

/// The identity of the calling process. Throws vmmpp::error when /proc/self/stat cannot be read
/// (a process budget needs /proc).
inline process_identity current_process_identity() {
    const pid_t pid = ::getpid();
    const auto fields = detail::proc::read_stat(pid);
    if (!fields) {
        throw error("vmmpp process budget: cannot read /proc/" + std::to_string(pid) +
                    "/stat (is /proc mounted?): " + std::strerror(errno));
    }
    return {pid, fields->start_time, detail::proc::image_tag()};
}

/// Whether the process `id` may still be running. False only when vmmpp is sure it is not:
/// no process has the pid, the process with the pid started at another time (the pid was
/// reused), it is a zombie (exited, not yet reaped by its parent), or it is the calling process
/// under another image tag (an image that exec has replaced: only the process itself can tell).
/// When the pid exists but /proc does not show it (hidepid, another pid namespace), it answers
/// true: a share is never taken from a process that might be alive.
inline bool is_process_running(const process_identity& id) noexcept {
    if (id.pid <= 0) {
        return false;
    }
    if (const auto fields = detail::proc::read_stat(id.pid)) {
        if (fields->start_time != id.start_time) {
            return false;  // the pid belongs to a later process now
        }
        if (id.pid == ::getpid() && id.image != detail::proc::image_tag()) {
            return false;  // this process, before an exec: that image's memory is gone
        }
        if (fields->state == 'Z' || fields->state == 'X') {
            // A zombie has released nothing and never will. (A thread-group leader that called
            // pthread_exit shows 'Z' while its other threads run: then Threads is above 1.)
            return detail::proc::thread_count(id.pid) > 1;
        }
        return true;
    }
    // /proc says nothing: ask the kernel whether the pid exists at all.
    return ::kill(id.pid, 0) == 0 || errno == EPERM;
}

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
    std::size_t max_models = 0;
    std::size_t max_records = 0;
    std::vector<process_usage> usage;   ///< every (model, process) record in use
};

namespace detail::pb {

// The segment, in order: header | model_slot[max_models] | record_slot[max_records].
// `magic` and `version` are the first 12 bytes in every version of the layout.
// Version 2 added record_slot::image (version 1 could not tell an exec'd image from its successor).
inline constexpr std::uint64_t magic = 0x3154454742505056ull;  // "VPPBGET1" read little-endian
inline constexpr std::uint32_t version = 2;
inline constexpr std::size_t name_capacity = 64;  // bytes, the terminating NUL included

struct model_slot {
    char name[name_capacity];  // NUL-terminated; empty: a free slot
    std::uint64_t limit;
    std::uint64_t committed;  // = the sum of its records' bytes
    std::uint64_t peak;
    std::uint64_t denied;
};

struct record_slot {
    std::int64_t pid;  // 0: a free slot
    std::uint64_t start_time;
    std::uint64_t image;  // process_identity::image
    std::uint64_t model;  // index into the model table (checked against it wherever it is used)
    std::uint64_t bytes;  // what this process holds of this model's budget
};

struct header {
    std::atomic<std::uint64_t> magic;  // stored last, with release, by the creator
    std::uint32_t version;
    std::uint32_t header_bytes;
    std::uint64_t total_bytes;
    std::uint32_t model_slot_bytes;
    std::uint32_t record_slot_bytes;
    std::uint32_t mutex_bytes;
    std::uint32_t max_models;
    std::uint32_t max_records;
    std::uint32_t padding;
    std::uint64_t models_offset;
    std::uint64_t records_offset;
    pthread_mutex_t mutex;  // process-shared, robust
    std::uint64_t limit;
    std::uint64_t committed;  // = the sum of the models' committed
    std::uint64_t peak;
    std::uint64_t denied;
    std::uint64_t reclaimed_bytes;
    std::uint64_t reclaimed_records;
    std::uint64_t repairs;
    std::int64_t creator_pid;
    std::uint64_t creator_start_time;
    // The creator's pid and time namespaces (device and inode of /proc/self/ns/{pid,time}; 0
    // where unknown). Pids and start times mean the same only inside one pid namespace (and
    // /proc shifts start times by the reader's time namespace), so others may not attach.
    std::uint64_t pid_ns_dev;
    std::uint64_t pid_ns_ino;
    std::uint64_t time_ns_dev;
    std::uint64_t time_ns_ino;
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
              "a process budget needs lock-free (address-free) 64-bit atomics");
static_assert(offsetof(header, version) == 8, "magic and version lead every layout");

inline constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) / a * a; }
inline constexpr std::size_t models_offset() noexcept { return align_up(sizeof(header), 64); }
inline constexpr std::size_t records_offset(std::size_t max_models) noexcept {
    return align_up(models_offset() + max_models * sizeof(model_slot), 64);
}
inline constexpr std::size_t total_bytes(std::size_t max_models, std::size_t max_records) noexcept {
    return records_offset(max_models) + max_records * sizeof(record_slot);
}

/// Where a segment's tables lie, validated once when this process attaches (or made by it when
/// it creates) and kept here: the copy in the segment is never read again, so whoever writes the
/// segment later cannot move this process's reads and writes outside its mapping.
struct layout {
    std::uint32_t max_models = 0;
    std::uint32_t max_records = 0;
    std::size_t models_offset = 0;
    std::size_t records_offset = 0;
    std::size_t total_bytes = 0;
};
inline constexpr layout layout_of(std::uint32_t max_models, std::uint32_t max_records) noexcept {
    return {max_models, max_records, models_offset(), records_offset(max_models), total_bytes(max_models, max_records)};
}

/// Which object a name named when this process opened it (device and inode).
struct file_id {
    std::uint64_t dev = 0;
    std::uint64_t ino = 0;
    friend bool operator==(const file_id&, const file_id&) = default;
};
inline file_id file_of(const struct stat& st) noexcept {
    return {static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}

/// Reads a field of the shared header exactly once (a volatile load: the compiler may not read it
/// again later), so a value that is checked is the value that is used.
template <class T>
T read_once(const T& field) noexcept {
    return *static_cast<const volatile T*>(&field);
}

/// A namespace's identity: device and inode of its /proc/self/ns entry; {0, 0} where unknown.
struct namespace_id {
    std::uint64_t dev = 0;
    std::uint64_t ino = 0;
};
inline namespace_id namespace_of(const char* path) noexcept {
    struct stat st {};
    if (::stat(path, &st) != 0) {
        return {};
    }
    return {static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}
/// Whether two namespace ids may differ: both known and not equal.
inline bool differ(std::uint64_t dev_a, std::uint64_t ino_a, const namespace_id& b) noexcept {
    return ino_a != 0 && b.ino != 0 && (dev_a != b.dev || ino_a != b.ino);
}

/// A model slot's name (bounded even if the segment was scribbled on).
inline std::string_view slot_name(const model_slot& m) noexcept {
    return {m.name, ::strnlen(m.name, name_capacity)};
}

/// Keeps the compiler from moving the stores before it past the stores after it, so a process
/// killed between two instructions leaves the segment in an order repair() understands.
inline void ordered() noexcept { std::atomic_signal_fence(std::memory_order_seq_cst); }

inline std::string errno_text(int err) { return std::strerror(err); }

/// This process's mapping of one segment. Owned through shared_ptr by every process_budget and
/// process_quota of this process that uses it; unmapped when the last one goes. Its layout is
/// this process's copy (see `layout`), and every record's model index is checked against it.
class segment {
public:
    segment(std::string name, void* base, layout l, file_id file, process_identity self, bool created) noexcept
        : name_(std::move(name)), base_(base), layout_(l), file_(file), self_(self), created_(created) {}
    segment(const segment&) = delete;
    segment& operator=(const segment&) = delete;
    ~segment() { ::munmap(base_, layout_.total_bytes); }

    [[nodiscard]] const std::string& name() const noexcept { return name_; }
    [[nodiscard]] bool created() const noexcept { return created_; }
    /// The object this process mapped, as it was named then.
    [[nodiscard]] const file_id& file() const noexcept { return file_; }
    /// The calling process: the identity taken when this process attached, or, in a child made
    /// by fork since, the child's own (read at the call, so the child gets records of its own).
    [[nodiscard]] process_identity self() const {
        return ::getpid() == self_.pid ? self_ : current_process_identity();
    }
    [[nodiscard]] header& head() const noexcept { return *static_cast<header*>(base_); }
    [[nodiscard]] model_slot* models() const noexcept {
        return reinterpret_cast<model_slot*>(static_cast<std::byte*>(base_) + layout_.models_offset);
    }
    [[nodiscard]] record_slot* records() const noexcept {
        return reinterpret_cast<record_slot*>(static_cast<std::byte*>(base_) + layout_.records_offset);
    }
    [[nodiscard]] std::uint32_t max_models() const noexcept { return layout_.max_models; }
    [[nodiscard]] std::uint32_t max_records() const noexcept { return layout_.max_records; }
    /// The model slot a record points at, or nullptr when its index lies outside the table.
    [[nodiscard]] model_slot* model_of(const record_slot& r) const noexcept {
        const std::uint64_t i = r.model;  // one read: the check and the use see the same index
        return i < layout_.max_models ? models() + i : nullptr;
    }

    /// Locks the segment's mutex. If its last owner died holding it, repairs the state first.
    /// Returns 0 or the error of pthread_mutex_lock.
    int lock() const noexcept {
        const int rc = ::pthread_mutex_lock(&head().mutex);
        if (rc == EOWNERDEAD) {
            repair();
            ++head().repairs;
            if (const int c = ::pthread_mutex_consistent(&head().mutex); c != 0) {
                ::pthread_mutex_unlock(&head().mutex);
                return c;
            }
            return 0;
        }
        return rc;
    }
    void unlock() const noexcept { ::pthread_mutex_unlock(&head().mutex); }

    /// Rebuilds every total from the usage records, the one source of truth: a process killed
    /// half way through an update leaves a record consistent (one aligned store) but the totals
    /// after it behind. Frees records that point at no model. Called with the lock held.
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

    /// Frees the records of every dead process and gives their bytes back. Returns the bytes.
    /// Liveness is read from /proc without the lock (a dead identity never comes back to life).
    std::size_t reclaim_dead() const;

private:
    std::string name_;
    void* base_;
    layout layout_;
    file_id file_;
    process_identity self_;
    bool created_;
};

/// Holds a segment's lock for a scope; throws vmmpp::error if it cannot be taken.
class lock_guard {
public:
    explicit lock_guard(const segment& s) : s_(s) {
        if (const int rc = s.lock(); rc != 0) {
            throw error("vmmpp process budget '" + s.name() + "': pthread_mutex_lock failed: " + errno_text(rc));
        }
    }
    lock_guard(const lock_guard&) = delete;
    lock_guard& operator=(const lock_guard&) = delete;
    ~lock_guard() { s_.unlock(); }

private:
    const segment& s_;
};

/// The process a record belongs to.
inline process_identity identity_of(const record_slot& r) noexcept {
    return {static_cast<pid_t>(r.pid), r.start_time, r.image};
}

inline bool owns(const record_slot& r, const process_identity& who, std::uint64_t model) noexcept {
    return r.pid != 0 && identity_of(r) == who && r.model == model;
}

inline std::size_t segment::reclaim_dead() const {
    const process_identity me = self();
    std::vector<process_identity> others;
    {
        lock_guard lock(*this);
        const record_slot* r = records();
        for (std::uint32_t i = 0; i < max_records(); ++i) {
            const process_identity id = identity_of(r[i]);
            if (r[i].pid != 0 && id != me && std::find(others.begin(), others.end(), id) == others.end()) {
                others.push_back(id);
            }
        }
    }
    std::vector<process_identity> dead;
    for (const auto& id : others) {
        if (!is_process_running(id)) {  // also this process's records from before an exec
            dead.push_back(id);
        }
    }
    if (dead.empty()) {
        return 0;
    }
    std::size_t reclaimed = 0;
    lock_guard lock(*this);
    header& h = head();
    record_slot* r = records();
    for (std::uint32_t i = 0; i < max_records(); ++i) {
        if (r[i].pid == 0 || std::find(dead.begin(), dead.end(), identity_of(r[i])) == dead.end()) {
            continue;
        }
        const std::uint64_t bytes = r[i].bytes;
        r[i].bytes = 0;
        ordered();
        r[i].pid = 0;
        ordered();
        if (model_slot* m = model_of(r[i])) {
            m->committed -= std::min(bytes, m->committed);
        }
        h.committed -= std::min<std::uint64_t>(bytes, h.committed);
        h.reclaimed_bytes += bytes;
        ++h.reclaimed_records;
        reclaimed += bytes;
    }
    return reclaimed;
}

/// "/name": the form shm_open wants. Throws vmmpp::invalid_argument for a name it refuses.
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

/// Closes a descriptor at the end of a scope.
struct fd_closer {
    int fd;
    ~fd_closer() {
        if (fd >= 0) {
            ::close(fd);
        }
    }
};

/// Throws vmmpp::untrusted_segment unless the object `st` describes is owned by this process's
/// effective uid or by one of `o.trusted_owners`.
inline void check_owner(const std::string& name, const struct stat& st, const process_budget_options& o) {
    const uid_t self = ::geteuid();
    if (st.st_uid != self && std::find(o.trusted_owners.begin(), o.trusted_owners.end(), st.st_uid) ==
                                 o.trusted_owners.end()) {
        throw untrusted_segment(name, st.st_uid, self, st.st_mode, "is owned by another user");
    }
}

/// The fstat of the object behind `fd`, once it has passed every check of trust: a regular
/// object, an accepted owner, and no write permission for group or others unless allowed.
inline struct stat trusted_stat(const std::string& name, int fd, const process_budget_options& o) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        throw error("vmmpp process budget '" + name + "': fstat failed: " + errno_text(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        throw invalid_argument("shared memory object '" + name + "' is not a regular object");
    }
    check_owner(name, st, o);
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && !o.allow_shared_write) {
        throw untrusted_segment(name, st.st_uid, ::geteuid(), st.st_mode, "may be written by its group or others");
    }
    return st;
}

/// Creates and initialises the segment `name`; nullptr if it exists already.
inline std::shared_ptr<segment> create(const std::string& name, std::size_t limit, const process_budget_options& o,
                                       const process_identity& self) {
    if (limit == 0) {
        throw invalid_argument("process budget '" + name + "': the global limit must not be zero");
    }
    if (o.max_models == 0 || o.max_records == 0) {
        throw invalid_argument("process budget '" + name + "': max_models and max_records must not be zero");
    }
    if ((o.mode & ~mode_t{0777}) != 0) {
        throw invalid_argument("process budget '" + name + "': mode must be permission bits (at most 0777)");
    }
    if ((o.mode & (S_IWGRP | S_IWOTH)) != 0 && !o.allow_shared_write) {
        char mode[16];
        std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(o.mode));
        throw invalid_argument("process budget '" + name + "': mode " + mode +
                               " lets group or others write the segment, and whoever writes it controls every "
                               "process attached: set process_budget_options::allow_shared_write to make it anyway");
    }
    const layout l = layout_of(o.max_models, o.max_records);
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, o.mode);
    if (fd < 0) {
        if (errno == EEXIST) {
            return nullptr;
        }
        throw error("vmmpp process budget '" + name + "': shm_open(O_CREAT) failed: " + errno_text(errno));
    }
    fd_closer closer{fd};
    auto fail = [&](const char* call, int err) -> error {
        ::shm_unlink(name.c_str());
        return error("vmmpp process budget '" + name + "': " + call + " failed: " + errno_text(err));
    };
    if (::fchmod(fd, o.mode) != 0) {  // shm_open's mode went through the umask
        throw fail("fchmod", errno);
    }
    if (::ftruncate(fd, static_cast<off_t>(l.total_bytes)) != 0) {
        throw fail("ftruncate", errno);
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        throw fail("fstat", errno);
    }
    void* base = ::mmap(nullptr, l.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        throw fail("mmap", errno);
    }
    // The file is zero-filled: every model and record slot is free already.
    header* h = ::new (base) header();
    h->version = version;
    h->header_bytes = sizeof(header);
    h->total_bytes = l.total_bytes;
    h->model_slot_bytes = sizeof(model_slot);
    h->record_slot_bytes = sizeof(record_slot);
    h->mutex_bytes = sizeof(pthread_mutex_t);
    h->max_models = l.max_models;
    h->max_records = l.max_records;
    h->models_offset = l.models_offset;
    h->records_offset = l.records_offset;
    h->limit = limit;
    h->creator_pid = self.pid;
    h->creator_start_time = self.start_time;
    const namespace_id pid_ns = namespace_of("/proc/self/ns/pid");
    const namespace_id time_ns = namespace_of("/proc/self/ns/time");
    h->pid_ns_dev = pid_ns.dev;
    h->pid_ns_ino = pid_ns.ino;
    h->time_ns_dev = time_ns.dev;
    h->time_ns_ino = time_ns.ino;
    pthread_mutexattr_t attr;
    int rc = ::pthread_mutexattr_init(&attr);
    if (rc == 0) {
        rc = ::pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    }
    if (rc == 0) {
        rc = ::pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    }
    if (rc == 0) {
        rc = ::pthread_mutex_init(&h->mutex, &attr);
    }
    ::pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        ::munmap(base, l.total_bytes);
        throw fail("pthread_mutex_init (process-shared, robust)", rc);
    }
    h->magic.store(magic, std::memory_order_release);  // published: attachers may use it now
    return std::make_shared<segment>(name, base, l, file_of(st), self, true);
}

/// Attaches the segment `name`; nullptr if there is none. Checks, in order: that the object may
/// be trusted (owner and mode, before anything of it is read); waits up to the timeout for a
/// creator that is still initialising it (mapping its header alone); reads the header's layout
/// once and checks magic, version, layout, the object's size (before mapping it whole) and the
/// namespaces. The layout it checked is the one the segment object keeps.
inline std::shared_ptr<segment> open(const std::string& name, const process_budget_options& o,
                                     const process_identity& self) {
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        const int err = errno;
        if (err == ENOENT) {
            return nullptr;
        }
        throw error("vmmpp process budget '" + name + "': shm_open failed: " + errno_text(err) +
                    (err == EACCES ? " (its mode does not let this user attach)" : ""));
    }
    fd_closer closer{fd};
    struct stat st = trusted_stat(name, fd, o);
    const auto deadline = std::chrono::steady_clock::now() + o.attach_timeout;
    void* head_map = MAP_FAILED;
    std::uint64_t seen_magic = 0;
    for (;;) {
        if (head_map == MAP_FAILED) {
            if (::fstat(fd, &st) != 0) {
                throw error("vmmpp process budget '" + name + "': fstat failed: " + errno_text(errno));
            }
            if (static_cast<std::size_t>(st.st_size) >= sizeof(header)) {
                head_map = ::mmap(nullptr, sizeof(header), PROT_READ, MAP_SHARED, fd, 0);
                if (head_map == MAP_FAILED) {
                    throw error("vmmpp process budget '" + name + "': mmap failed: " + errno_text(errno));
                }
            }
        }
        if (head_map != MAP_FAILED) {
            seen_magic = static_cast<const header*>(head_map)->magic.load(std::memory_order_acquire);
            if (seen_magic != 0) {
                break;
            }
        }
        if (std::chrono::steady_clock::now() >= deadline) {
            if (head_map != MAP_FAILED) {
                ::munmap(head_map, sizeof(header));
            }
            throw invalid_argument("shared memory object '" + name + "' is not an initialised vmmpp process budget "
                                   "after " + std::to_string(o.attach_timeout.count()) + " ms (its creator died "
                                   "while creating it, or it is something else): remove it with "
                                   "vmmpp::process_budget::remove");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    // Each field once: what is checked below is what is used.
    const header& h = *static_cast<const header*>(head_map);
    const std::uint32_t seen_version = read_once(h.version);
    const std::uint32_t header_bytes = read_once(h.header_bytes);
    const std::uint64_t seen_total = read_once(h.total_bytes);
    const std::uint32_t model_slot_bytes = read_once(h.model_slot_bytes);
    const std::uint32_t record_slot_bytes = read_once(h.record_slot_bytes);
    const std::uint32_t mutex_bytes = read_once(h.mutex_bytes);
    const std::uint32_t max_models = read_once(h.max_models);
    const std::uint32_t max_records = read_once(h.max_records);
    const std::uint64_t seen_models_offset = read_once(h.models_offset);
    const std::uint64_t seen_records_offset = read_once(h.records_offset);
    const namespace_id pid_ns{read_once(h.pid_ns_dev), read_once(h.pid_ns_ino)};
    const namespace_id time_ns{read_once(h.time_ns_dev), read_once(h.time_ns_ino)};
    ::munmap(head_map, sizeof(header));
    auto reject = [&](const std::string& why) { return invalid_argument("shared memory object '" + name + "' " + why); };
    if (seen_magic != magic) {
        throw reject("is not a vmmpp process budget (magic " + std::to_string(seen_magic) + ", expected " +
                     std::to_string(magic) + ")");
    }
    if (seen_version != version) {
        throw reject("is a vmmpp process budget of layout version " + std::to_string(seen_version) +
                     "; this vmmpp reads version " + std::to_string(version) +
                     " (the processes sharing it must use one vmmpp version)");
    }
    const layout l = layout_of(max_models, max_records);
    if (header_bytes != sizeof(header) || model_slot_bytes != sizeof(model_slot) ||
        record_slot_bytes != sizeof(record_slot) || mutex_bytes != sizeof(pthread_mutex_t) || max_models == 0 ||
        max_records == 0 || seen_models_offset != l.models_offset || seen_records_offset != l.records_offset ||
        seen_total != l.total_bytes) {
        throw reject("is a vmmpp process budget laid out for another ABI (header " + std::to_string(header_bytes) +
                     " bytes, here " + std::to_string(sizeof(header)) + "; " + std::to_string(seen_total) +
                     " bytes in all for " + std::to_string(max_models) + " models and " + std::to_string(max_records) +
                     " records, here " + std::to_string(l.total_bytes) + "): built with another compiler or architecture?");
    }
    if (differ(pid_ns.dev, pid_ns.ino, namespace_of("/proc/self/ns/pid")) ||
        differ(time_ns.dev, time_ns.ino, namespace_of("/proc/self/ns/time"))) {
        throw reject("was created in another pid or time namespace, where pids and start times mean "
                     "something else: the processes sharing a budget must share those namespaces");
    }
    // The object must hold the whole layout before it is mapped: a shorter one would fault (SIGBUS)
    // on the first access past its end. (A writer shrinking it later still can: see MULTIPROCESS.md.)
    if (::fstat(fd, &st) != 0) {
        throw error("vmmpp process budget '" + name + "': fstat failed: " + errno_text(errno));
    }
    if (static_cast<std::uint64_t>(st.st_size) != l.total_bytes) {
        throw reject("is " + std::to_string(st.st_size) + " bytes long, but its layout needs " +
                     std::to_string(l.total_bytes));
    }
    void* base = ::mmap(nullptr, l.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        throw error("vmmpp process budget '" + name + "': mmap failed: " + errno_text(errno));
    }
    return std::make_shared<segment>(name, base, l, file_of(st), self, false);
}

} // namespace detail::pb

/// One model's share of a process budget, charged to the calling process: the quota policy of
/// its pools. Copies charge the same model and process.
///
/// Thread and process safety: acquire, release, stats and process_committed may be called at
/// once from any threads of any processes; each is one critical section of the segment's lock.
/// A process_quota belongs to the process that registered it: in a child made by fork (without
/// exec), acquire throws vmmpp::invalid_argument and release does nothing; register again there.
class process_quota {
public:
    /// Takes `bytes` from this model's limit and the global limit together, or throws
    /// vmmpp::over_quota naming the limit that refused it ("model <name>" or "global") and
    /// changes nothing but the denied counters. Before refusing, it takes back the shares of dead
    /// processes and tries once more.
    void acquire(std::size_t bytes) {
        check_process("acquire");
        for (int attempt = 0;; ++attempt) {
            {
                detail::pb::lock_guard lock(*segment_);
                detail::pb::header& h = segment_->head();
                detail::pb::model_slot& m = segment_->models()[model_];
                detail::pb::record_slot& r = segment_->records()[record_];
                if (!detail::pb::owns(r, who_, model_)) {
                    throw error("vmmpp process budget '" + segment_->name() + "': the usage record of model '" +
                                name_ + "' in this process was freed (was this process taken for dead?)");
                }
                const std::uint64_t model_left = m.limit > m.committed ? m.limit - m.committed : 0;
                const std::uint64_t global_left = h.limit > h.committed ? h.limit - h.committed : 0;
                if (bytes <= model_left && bytes <= global_left) {
                    r.bytes += bytes;  // the record first: repair() rebuilds the rest from it
                    detail::pb::ordered();
                    m.committed += bytes;
                    m.peak = std::max(m.peak, m.committed);
                    h.committed += bytes;
                    h.peak = std::max(h.peak, h.committed);
                    return;
                }
                if (attempt > 0) {
                    ++m.denied;
                    ++h.denied;
                    if (bytes > model_left) {
                        throw over_quota("model " + name_, bytes, m.committed, m.limit);
                    }
                    throw over_quota("global", bytes, h.committed, h.limit);
                }
            }
            segment_->reclaim_dead();
        }
    }

    /// Gives `bytes` back to both limits (at most what this process holds of this model).
    void release(std::size_t bytes) noexcept {
        if (::getpid() != who_.pid || segment_->lock() != 0) {
            return;
        }
        detail::pb::header& h = segment_->head();
        detail::pb::model_slot& m = segment_->models()[model_];
        detail::pb::record_slot& r = segment_->records()[record_];
        if (detail::pb::owns(r, who_, model_)) {
            const std::uint64_t n = std::min<std::uint64_t>(bytes, r.bytes);  // never underflow on misuse
            r.bytes -= n;
            detail::pb::ordered();
            m.committed -= std::min(n, m.committed);
            h.committed -= std::min(n, h.committed);
        }
        segment_->unlock();
    }

    /// This model's statistics now, over every process.
    [[nodiscard]] model_stats stats() const {
        detail::pb::lock_guard lock(*segment_);
        const detail::pb::model_slot& m = segment_->models()[model_];
        return model_stats{name_, m.limit, m.committed, m.peak, m.denied};
    }

    /// The bytes this process holds of this model now.
    [[nodiscard]] std::size_t process_committed() const {
        detail::pb::lock_guard lock(*segment_);
        const detail::pb::record_slot& r = segment_->records()[record_];
        return detail::pb::owns(r, who_, model_) ? r.bytes : 0;
    }

    [[nodiscard]] const std::string& name() const noexcept { return name_; }

private:
    friend class process_budget;
    friend struct detail::process_budget_access;
    process_quota(std::shared_ptr<detail::pb::segment> s, std::uint32_t model, std::uint32_t record,
                  process_identity who, std::string name)
        : segment_(std::move(s)), model_(model), record_(record), who_(who), name_(std::move(name)) {}

    void check_process(const char* what) const {
        if (::getpid() != who_.pid) {
            throw invalid_argument(std::string(what) + " on the process quota of model '" + name_ + "' in process " +
                                   std::to_string(::getpid()) + ", a fork of process " + std::to_string(who_.pid) +
                                   " that registered it: register the model again in this process");
        }
    }

    std::shared_ptr<detail::pb::segment> segment_;
    std::uint32_t model_;
    std::uint32_t record_;
    process_identity who_;
    std::string name_;
};

static_assert(quota_policy<process_quota>, "vmmpp::process_quota must model vmmpp::quota_policy");

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
        const process_identity self = current_process_identity();
        auto s = detail::pb::create(n, global_limit, options, self);
        if (!s) {
            throw invalid_argument("process budget '" + n +
                                   "' exists already (remove it, or use open or create_or_open)");
        }
        return process_budget(std::move(s));
    }

    /// Attaches the existing segment `name` (`options.attach_timeout`, `trusted_owners` and
    /// `allow_shared_write` are used). Throws vmmpp::untrusted_segment, before reading anything
    /// of it, if another user owns it or group or others may write it (unless the options accept
    /// that); vmmpp::invalid_argument if there is none, or if it is not a vmmpp process budget of
    /// this layout version and ABI. Takes back the shares of dead processes.
    [[nodiscard]] static process_budget open(std::string_view name, process_budget_options options = {}) {
        const std::string n = detail::pb::shm_name(name);
        const process_identity self = current_process_identity();
        auto s = detail::pb::open(n, options, self);
        if (!s) {
            throw invalid_argument("process budget '" + n + "' does not exist");
        }
        process_budget b(std::move(s));
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
            if (auto s = detail::pb::create(n, global_limit, options, self)) {
                return process_budget(std::move(s));
            }
            if (auto s = detail::pb::open(n, options, self)) {
                process_budget b(std::move(s));
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
        if (const int fd = ::shm_open(n.c_str(), O_RDONLY | O_CLOEXEC, 0); fd >= 0) {
            detail::pb::fd_closer closer{fd};
            struct stat st {};
            if (::fstat(fd, &st) != 0) {
                throw error("vmmpp process budget '" + n + "': fstat failed: " + detail::pb::errno_text(errno));
            }
            detail::pb::check_owner(n, st, options);
        } else if (errno == ENOENT) {
            return false;
        } else if (errno != EACCES) {
            throw error("vmmpp process budget '" + n + "': shm_open failed: " + detail::pb::errno_text(errno));
        }
        // (EACCES: this process is not root, so /dev/shm's sticky bit lets the kernel refuse to
        // unlink another user's object.)
        return unlink(n);
    }

    /// Unlinks this handle's segment, if its name still names it: another process may have
    /// removed it and created another under the name since, which stays. Returns whether it
    /// unlinked.
    bool remove() const {
        const std::string& n = segment_->name();
        const int fd = ::shm_open(n.c_str(), O_RDONLY | O_CLOEXEC, 0);
        if (fd < 0) {
            if (errno == ENOENT) {
                return false;
            }
            throw error("vmmpp process budget '" + n + "': shm_open failed: " + detail::pb::errno_text(errno));
        }
        detail::pb::fd_closer closer{fd};
        struct stat st {};
        if (::fstat(fd, &st) != 0) {
            throw error("vmmpp process budget '" + n + "': fstat failed: " + detail::pb::errno_text(errno));
        }
        if (detail::pb::file_of(st) != segment_->file()) {
            return false;  // another segment under the same name
        }
        return unlink(n);
    }

    /// Registers model `name` for this process, which may then commit through the returned
    /// quota. The first registration (by any process) creates the model with `limit`; later
    /// ones, from this or other processes, join it and must state the same limit. The model's
    /// limit bounds the sum over all processes. Names are 1 to 63 bytes. Models stay in the
    /// table as long as the segment exists. The process is the calling one: in a child made by
    /// fork, registering through the inherited handle gives the child a record of its own.
    [[nodiscard]] process_quota register_model(std::string_view name, std::size_t limit) {
        return register_model_as(name, limit, segment_->self());
    }

    /// Takes back the bytes of every process that has died without releasing them and frees
    /// their usage records. Returns the bytes taken back.
    std::size_t reclaim_dead() { return segment_->reclaim_dead(); }

    /// A consistent snapshot of the budget, every model and every usage record.
    [[nodiscard]] process_budget_stats stats() const {
        process_budget_stats s;
        detail::pb::lock_guard lock(*segment_);
        const detail::pb::header& h = segment_->head();
        const detail::pb::model_slot* m = segment_->models();
        const detail::pb::record_slot* r = segment_->records();
        s.limit = h.limit;
        s.committed = h.committed;
        s.peak = h.peak;
        s.denied = h.denied;
        s.reclaimed = h.reclaimed_bytes;
        s.reclaimed_records = h.reclaimed_records;
        s.repairs = h.repairs;
        s.max_models = segment_->max_models();
        s.max_records = segment_->max_records();
        for (std::uint32_t i = 0; i < segment_->max_models(); ++i) {
            if (m[i].name[0] != '\0') {
                s.models.push_back(model_stats{std::string(detail::pb::slot_name(m[i])), m[i].limit, m[i].committed,
                                               m[i].peak, m[i].denied});
            }
        }
        for (std::uint32_t i = 0; i < segment_->max_records(); ++i) {
            if (const detail::pb::model_slot* owner = segment_->model_of(r[i]); r[i].pid != 0 && owner != nullptr) {
                s.usage.push_back(process_usage{std::string(detail::pb::slot_name(*owner)),
                                                detail::pb::identity_of(r[i]), r[i].bytes});
            }
        }
        return s;
    }

    /// The global limit (set by the creator; never changes).
    [[nodiscard]] std::size_t limit() const noexcept { return segment_->head().limit; }
    /// The segment's name, as shm_open sees it ("/name").
    [[nodiscard]] const std::string& name() const noexcept { return segment_->name(); }
    /// Whether this handle created the segment (false: it attached to an existing one).
    [[nodiscard]] bool created() const noexcept { return segment_->created(); }

private:
    friend struct detail::process_budget_access;
    explicit process_budget(std::shared_ptr<detail::pb::segment> s) : segment_(std::move(s)) {}

    static bool unlink(const std::string& n) {
        if (::shm_unlink(n.c_str()) == 0) {
            return true;
        }
        if (errno == ENOENT) {
            return false;
        }
        throw error("vmmpp process budget '" + n + "': shm_unlink failed: " + detail::pb::errno_text(errno));
    }

    process_quota register_model_as(std::string_view name, std::size_t limit, const process_identity& who) {
        if (name.empty() || name.size() >= detail::pb::name_capacity || name.find('\0') != std::string_view::npos) {
            throw invalid_argument("model name '" + std::string(name) + "' must be 1 to " +
                                   std::to_string(detail::pb::name_capacity - 1) + " bytes without NUL");
        }
        if (limit == 0) {
            throw invalid_argument("model '" + std::string(name) + "' needs a non-zero limit");
        }
        const detail::pb::segment& s = *segment_;
        for (int attempt = 0;; ++attempt) {
            {
                detail::pb::lock_guard lock(s);
                detail::pb::model_slot* m = s.models();
                detail::pb::record_slot* r = s.records();
                std::uint32_t model = s.max_models();
                std::uint32_t free_model = s.max_models();
                for (std::uint32_t i = 0; i < s.max_models(); ++i) {
                    if (m[i].name[0] == '\0') {
                        free_model = std::min(free_model, i);
                    } else if (name == detail::pb::slot_name(m[i])) {
                        model = i;
                        break;
                    }
                }
                if (model < s.max_models()) {
                    if (m[model].limit != limit) {
                        throw invalid_argument("model '" + std::string(name) + "' is registered with limit " +
                                               std::to_string(m[model].limit) + " bytes in process budget '" +
                                               s.name() + "', not " + std::to_string(limit));
                    }
                    for (std::uint32_t i = 0; i < s.max_records(); ++i) {
                        if (detail::pb::owns(r[i], who, model)) {
                            return process_quota(segment_, model, i, who, std::string(name));
                        }
                    }
                } else if (free_model == s.max_models()) {
                    throw error("vmmpp process budget '" + s.name() + "' has no room for model '" + std::string(name) +
                                "': all " + std::to_string(s.max_models()) +
                                " model slots are taken (process_budget_options::max_models)");
                }
                std::uint32_t record = s.max_records();
                for (std::uint32_t i = 0; i < s.max_records(); ++i) {
                    if (r[i].pid == 0) {
                        record = i;
                        break;
                    }
                }
                if (record < s.max_records()) {
                    if (model == s.max_models()) {
                        model = free_model;
                        detail::pb::model_slot& slot = m[model];
                        slot.limit = limit;
                        slot.committed = 0;
                        slot.peak = 0;
                        slot.denied = 0;
                        std::memset(slot.name, 0, sizeof slot.name);
                        std::memcpy(slot.name + 1, name.data() + 1, name.size() - 1);
                        detail::pb::ordered();
                        slot.name[0] = name[0];  // the slot is taken from this store on
                    }
                    r[record].start_time = who.start_time;
                    r[record].image = who.image;
                    r[record].model = model;
                    r[record].bytes = 0;
                    detail::pb::ordered();
                    r[record].pid = who.pid;  // the record is taken from this store on
                    return process_quota(segment_, model, record, who, std::string(name));
                }
                if (attempt > 0) {
                    throw error("vmmpp process budget '" + s.name() + "' has no free usage record for model '" +
                                std::string(name) + "': all " + std::to_string(s.max_records()) +
                                " are held by live processes (process_budget_options::max_records)");
                }
            }
            s.reclaim_dead();
        }
    }

    std::shared_ptr<detail::pb::segment> segment_;
};

} // namespace vmmpp
