// vmmpp/quota/detail/budget_layout.hpp: the bytes of a process budget's shared-memory segment:
// header | model_slot[max_models] | record_slot[max_records]. Defines the slots and the header,
// computes where the tables lie, and checks a header another process wrote (magic, version,
// every size and offset, the creator's namespaces) before this process trusts any of it.
// Linux only.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <string_view>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"

namespace vmmpp::detail::pb {

/// The segment's first 8 bytes once its creator has initialised it ("VPPBGET1" read
/// little-endian). `magic` and `version` are the first 12 bytes in every version of the layout.
inline constexpr std::uint64_t magic = 0x3154454742505056ull;
/// The layout version. Version 2 added record_slot::image (version 1 could not tell an exec'd
/// image from its successor). Version 3 made limits changeable at run time: model_slot gained
/// registered_limit, generation, reclaims and reclaimed, record_slot gained spares, and the
/// header gained generation. Version 4 let a refused process ask the others for their spares: the
/// header gained the futex words wake_word and answer_word and the counters requests,
/// request_grants and request_reclaimed; record_slot gained answered, watching, asking_model and
/// asking_global.
inline constexpr std::uint32_t version = 4;
/// Bytes of a model name in its slot, the terminating NUL included.
inline constexpr std::size_t name_capacity = 64;

/// One model: its name, limit and totals over every process.
struct model_slot {
    char name[name_capacity];  // NUL-terminated; empty: a free slot
    std::uint64_t limit;             // in force now (changed at run time by set_model_limit)
    std::uint64_t committed;         // = the sum of its records' bytes
    std::uint64_t peak;
    std::uint64_t denied;
    std::uint64_t registered_limit;  // the limit it was created with: what joining processes state
    std::uint64_t generation;        // bumped when its limit is lowered below committed: reclaim now
    std::uint64_t reclaims;          // times a process's pools gave memory back for it when asked
    std::uint64_t reclaimed;         // the bytes they gave back
};

/// One (model, process image) usage record: the one source of truth the totals are rebuilt from.
struct record_slot {
    std::int64_t pid;  // 0: a free slot
    std::uint64_t start_time;
    std::uint64_t image;  // process_identity::image
    std::uint64_t model;  // index into the model table (checked against it wherever it is used)
    std::uint64_t bytes;  // what this process holds of this model's budget
    std::uint64_t spares; // spare bytes this process's pools of the model last reported
    std::uint64_t answered;       // the last request (header::requests) this process's watcher served
    std::uint32_t watching;       // 1: this process runs a watcher that serves requests
    std::uint32_t asking_model;   // threads of this process waiting for others to give back under the model's limit
    std::uint32_t asking_global;  // ... under the global limit
    // The largest request of those threads, in 4 KiB pages rounded up (capped): how much cached
    // memory the watchers evict for them. 0 when none asks, or the writer predates the field
    // (it was padding, always 0, in the same layout).
    std::uint32_t asking_pages;
};
/// The unit of record_slot::asking_pages.
inline constexpr std::size_t asking_page_bytes = 4096;

/// The segment's header: its self-description, the lock, the global totals and the creator.
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
    pthread_mutex_t mutex;  // process-shared, robust (robust_mutex.hpp)
    std::uint64_t limit;
    std::uint64_t committed;  // = the sum of the models' committed
    std::uint64_t peak;
    std::uint64_t denied;
    std::uint64_t reclaimed_bytes;
    std::uint64_t reclaimed_records;
    std::uint64_t repairs;
    std::uint64_t generation;  // bumped when the global limit is lowered below committed: reclaim now
    std::int64_t creator_pid;
    std::uint64_t creator_start_time;
    // The creator's pid and time namespaces (device and inode of /proc/self/ns/{pid,time}; 0
    // where unknown). Pids and start times mean the same only inside one pid namespace (and
    // /proc shifts start times by the reader's time namespace), so others may not attach.
    std::uint64_t pid_ns_dev;
    std::uint64_t pid_ns_ino;
    std::uint64_t time_ns_dev;
    std::uint64_t time_ns_ino;
    // Cross-process reclaim requests (futex.hpp's helpers wait on and wake these
    // two words; futexes on a MAP_SHARED mapping work across processes).
    std::atomic<std::uint32_t> wake_word;    // bumped to wake every watcher: a request, a lowered limit, a shutdown
    std::atomic<std::uint32_t> answer_word;  // bumped when a watcher has served a request: wakes the askers
    std::uint64_t requests;           // requests ever posted; a request's number is its ticket
    std::uint64_t request_grants;     // refused acquires that succeeded after asking
    std::uint64_t request_reclaimed;  // bytes watchers gave back on request
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
              "a process budget needs lock-free (address-free) 64-bit atomics");
static_assert(std::atomic<std::uint32_t>::is_always_lock_free && sizeof(std::atomic<std::uint32_t>) == 4,
              "a process budget's futex words must be plain 32-bit words");
static_assert(offsetof(header, version) == 8, "magic and version lead every layout");

/// `n` rounded up to a multiple of `a`.
inline constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) / a * a; }
/// Where the model table starts.
inline constexpr std::size_t models_offset() noexcept { return align_up(sizeof(header), 64); }
/// Where the record table starts, after `max_models` model slots.
inline constexpr std::size_t records_offset(std::size_t max_models) noexcept {
    return align_up(models_offset() + max_models * sizeof(model_slot), 64);
}
/// The size of a segment with these tables.
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

/// The layout of a segment with these tables.
inline constexpr layout layout_of(std::uint32_t max_models, std::uint32_t max_records) noexcept {
    return {max_models, max_records, models_offset(), records_offset(max_models), total_bytes(max_models, max_records)};
}

/// Reads a field of the shared header exactly once (a volatile load: the compiler may not read it
/// again later), so a value that is checked is the value that is used.
template <class T>
T read_once(const T& field) noexcept {
    return *static_cast<const volatile T*>(&field);
}

/// Writes a fresh header at `h` (zero-filled memory of layout `l`'s size) for a segment with
/// global limit `limit` made by `creator`. Leaves the mutex and `magic` to the caller: the mutex
/// is initialised next, and `magic` is stored last, to publish the segment.
/// Throws: nothing.
inline header* write_header(void* at, const layout& l, std::uint64_t limit, const process_identity& creator) noexcept {
    header* h = ::new (at) header();
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
    h->creator_pid = creator.pid;
    h->creator_start_time = creator.start_time;
    const proc::namespace_id pid_ns = proc::namespace_of("/proc/self/ns/pid");
    const proc::namespace_id time_ns = proc::namespace_of("/proc/self/ns/time");
    h->pid_ns_dev = pid_ns.dev;
    h->pid_ns_ino = pid_ns.ino;
    h->time_ns_dev = time_ns.dev;
    h->time_ns_ino = time_ns.ino;
    return h;
}

/// Checks the header of the segment `name`, whose published magic was `seen_magic`, reading each
/// field once (what is checked is what is used), and returns the layout it describes. Checks, in
/// order: magic, version, every size and offset (another compiler or architecture), and that the
/// creator's pid and time namespaces are this process's.
/// Throws: vmmpp::incompatible_segment saying what is wrong.
inline layout validate_header(const std::string& name, const header& h, std::uint64_t seen_magic) {
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
    const proc::namespace_id pid_ns{read_once(h.pid_ns_dev), read_once(h.pid_ns_ino)};
    const proc::namespace_id time_ns{read_once(h.time_ns_dev), read_once(h.time_ns_ino)};
    auto reject = [&](const std::string& why) { return incompatible_segment("shared memory object '" + name + "' " + why); };
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
    if (proc::differ(pid_ns, proc::namespace_of("/proc/self/ns/pid")) ||
        proc::differ(time_ns, proc::namespace_of("/proc/self/ns/time"))) {
        throw reject("was created in another pid or time namespace, where pids and start times mean "
                     "something else: the processes sharing a budget must share those namespaces");
    }
    return l;
}

/// A model slot's name (bounded even if the segment was scribbled on).
/// Throws: nothing.
inline std::string_view slot_name(const model_slot& m) noexcept {
    return {m.name, ::strnlen(m.name, name_capacity)};
}

/// Keeps the compiler from moving the stores before it past the stores after it, so a process
/// killed between two instructions leaves the segment in an order repair understands.
/// Throws: nothing.
inline void ordered() noexcept { std::atomic_signal_fence(std::memory_order_seq_cst); }

/// The process a record belongs to.
/// Throws: nothing.
inline process_identity identity_of(const record_slot& r) noexcept {
    return {static_cast<pid_t>(r.pid), r.start_time, r.image};
}

/// Whether record `r` is taken, by `who`, for model index `model`.
/// Throws: nothing.
inline bool owns(const record_slot& r, const process_identity& who, std::uint64_t model) noexcept {
    return r.pid != 0 && identity_of(r) == who && r.model == model;
}

} // namespace vmmpp::detail::pb
