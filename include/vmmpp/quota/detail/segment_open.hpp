// vmmpp/quota/detail/segment_open.hpp: creating, attaching and unlinking a budget segment.
//
// Creating: exact mode, zero-filled tables, the robust mutex, `magic` published last. Attaching:
// owner and mode checked before a byte of it is read, the header validated once, the object's
// size checked before it is mapped whole. Linux only.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "vmmpp/detail/unique_fd.hpp"
#include "vmmpp/error.hpp"
#include "vmmpp/quota/budget_errors.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/robust_mutex.hpp"
#include "vmmpp/quota/detail/segment_trust.hpp"
#include "vmmpp/quota/detail/shared_mapping.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"

namespace vmmpp::detail::pb {

/// strerror as a std::string.
/// Throws: std::bad_alloc.
inline std::string errno_text(int err) { return std::strerror(err); }
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
