// vmmpp/quota/detail/process_identity.hpp: who a process is, read from /proc, for the process
// budget. Parses /proc/<pid>/stat (state and start time) and /proc/<pid>/status (thread count),
// derives the exec image tag from AT_RANDOM, and names the pid and time namespaces. Defines the
// public process_identity, current_process_identity() and is_process_running(), which
// vmmpp/quota/process_budget.hpp makes available to users. Linux only.
#pragma once

#if !defined(__linux__)
#error "vmmpp/quota/detail/process_identity.hpp needs Linux: it reads /proc"
#endif

#include <fcntl.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>

#include "vmmpp/detail/unique_fd.hpp"
#include "vmmpp/error.hpp"

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

namespace detail::proc {

/// Reads at most `capacity - 1` bytes of a small file (a /proc entry) and NUL-terminates them.
/// Returns the length, or -1 with errno set.
/// Throws: nothing. Thread safety: any threads at once.
inline long read_small_file(const char* path, char* buffer, std::size_t capacity) noexcept {
    const unique_fd fd(::open(path, O_RDONLY | O_CLOEXEC));
    if (!fd) {
        return -1;
    }
    std::size_t length = 0;
    while (length + 1 < capacity) {
        const ssize_t n = ::read(fd.get(), buffer + length, capacity - 1 - length);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;  // errno survives the close (unique_fd keeps it)
        }
        if (n == 0) {
            break;
        }
        length += static_cast<std::size_t>(n);
    }
    buffer[length] = '\0';
    return static_cast<long>(length);
}

/// What vmmpp needs of /proc/<pid>/stat: field 3 (state) and field 22 (start time).
struct stat_fields {
    char state = '?';
    std::uint64_t start_time = 0;
};

/// Parses the text of /proc/<pid>/stat. Field 2 (the command name, in parentheses) may hold
/// spaces and parentheses itself, so fields are counted from the last ')'. Returns nullopt for
/// text that is cut short or whose start time is not a number.
/// Throws: nothing.
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

/// /proc/<pid>/stat of a process, or nullopt with errno set (ENOENT: no such process; EINVAL:
/// text that parse_stat refuses).
/// Throws: nothing. Thread safety: any threads at once.
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
/// Throws: nothing. Thread safety: any threads at once.
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

/// SipHash-2-4 of one 64-bit word under the 128-bit key `key` (16 bytes): a keyed pseudo-random
/// function, whose value tells nothing about the key.
/// Throws: nothing.
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
/// has another pid anyway), and the same in every copy of vmmpp linked into the process. Never 0.
///
/// It is derived from the 16 random bytes the kernel puts in every new image (AT_RANDOM), not from
/// a random number of vmmpp's own: a library with hidden symbols holds its own copy of every
/// vmmpp static, and two copies with two tags would take each other's records for those of an
/// image exec replaced. The bytes also seed glibc's stack protector, so they are not stored: the
/// tag is a keyed hash of a constant under them, which tells nothing about them.
/// Throws: nothing. Thread safety: any threads at once.
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

/// A namespace's identity: device and inode of its /proc/self/ns entry; {0, 0} where unknown.
struct namespace_id {
    std::uint64_t dev = 0;
    std::uint64_t ino = 0;
};

/// The namespace that `path` (such as "/proc/self/ns/pid") names; {0, 0} if it cannot be read
/// (an older kernel has no time namespace).
/// Throws: nothing. Thread safety: any threads at once.
inline namespace_id namespace_of(const char* path) noexcept {
    struct stat st {};
    if (::stat(path, &st) != 0) {
        return {};
    }
    return {static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)};
}

/// Whether two namespace ids may differ: both known and not equal.
/// Throws: nothing.
inline bool differ(const namespace_id& a, const namespace_id& b) noexcept {
    return a.ino != 0 && b.ino != 0 && (a.dev != b.dev || a.ino != b.ino);
}

} // namespace detail::proc

/// The identity of the calling process.
/// Throws: vmmpp::error when /proc/self/stat cannot be read (a process budget needs /proc).
/// Thread safety: any threads at once.
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
/// Throws: nothing. Thread safety: any threads at once.
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

} // namespace vmmpp
