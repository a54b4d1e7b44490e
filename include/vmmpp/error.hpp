// vmmpp/error.hpp: the typed errors every vmmpp layer throws. Each one names the numbers that
// explain it, so a log line is enough to see what went wrong.
#pragma once

#include <cstddef>
#include <iterator>
#include <stdexcept>
#include <string>

namespace vmmpp {

/// Root of every vmmpp error.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// A CUDA driver or runtime call failed: which call, its numeric code, the code's name and text.
class cuda_error : public error {
public:
    cuda_error(std::string call, int code, std::string name, std::string message)
        : error(call + " failed: " + name + " (" + std::to_string(code) + "): " + message),
          call_(std::move(call)), code_(code), name_(std::move(name)) {}

    /// The failing call, e.g. "cuMemCreate".
    [[nodiscard]] const std::string& call() const noexcept { return call_; }
    /// The numeric CUresult / cudaError_t.
    [[nodiscard]] int code() const noexcept { return code_; }
    /// The code's symbolic name, e.g. "CUDA_ERROR_OUT_OF_MEMORY".
    [[nodiscard]] const std::string& code_name() const noexcept { return name_; }

private:
    std::string call_;
    int code_;
    std::string name_;
};

/// No usable CUDA driver or device: libcuda.so.1 missing, cuInit failed, or no device.
class cuda_unavailable : public error {
public:
    using error::error;
};

namespace detail {
/// ", limit N bytes", or ", no limit" for 0: the errors below take 0 for "none" (an unlimited
/// pool, a failed mmap), and "limit 0 bytes" would blame a limit nobody set.
inline std::string limit_clause(std::size_t limit) {
    return limit == 0 ? std::string(", no limit") : ", limit " + std::to_string(limit) + " bytes";
}
/// `bytes` in the largest binary unit that states it exactly ("12 MiB", "4097 bytes").
inline std::string size_text(std::size_t bytes) {
    constexpr const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
    std::size_t u = 0;
    while (u + 1 < std::size(units) && bytes >= 1024 && bytes % 1024 == 0) {
        bytes /= 1024;
        ++u;
    }
    return std::to_string(bytes) + " " + units[u];
}
} // namespace detail

/// Physical memory could not be obtained: the request, what is committed, and the limit hit
/// (limit() is 0 where there is none).
class out_of_memory : public error {
public:
    out_of_memory(std::string what_limit, std::size_t requested, std::size_t committed, std::size_t limit)
        : error("out of memory (" + what_limit + "): requested " + std::to_string(requested) +
                " bytes with " + std::to_string(committed) + " bytes committed" + detail::limit_clause(limit)),
          requested_(requested), committed_(committed), limit_(limit) {}

    [[nodiscard]] std::size_t requested() const noexcept { return requested_; }
    [[nodiscard]] std::size_t committed() const noexcept { return committed_; }
    [[nodiscard]] std::size_t limit() const noexcept { return limit_; }

private:
    std::size_t requested_;
    std::size_t committed_;
    std::size_t limit_;
};

/// A quota refused a commit: which limit (a model's or the global one), the request, the use.
class over_quota : public error {
public:
    over_quota(std::string which, std::size_t requested, std::size_t in_use, std::size_t limit)
        : error("over quota (" + which + "): requested " + std::to_string(requested) + " bytes with " +
                std::to_string(in_use) + " bytes in use" + detail::limit_clause(limit)),
          which_(std::move(which)), requested_(requested), in_use_(in_use), limit_(limit) {}
    /// The same refusal told as the call that made it: "over quota (<which>): <call> needs 12 MiB
    /// more; 26 MiB in use, limit 32 MiB" (`requested` is everything the call needed charged).
    over_quota(std::string which, std::size_t requested, std::size_t in_use, std::size_t limit, const std::string& call)
        : error("over quota (" + which + "): " + call + " needs " + detail::size_text(requested) + " more; " +
                detail::size_text(in_use) + " in use" +
                (limit == 0 ? std::string(", no limit") : ", limit " + detail::size_text(limit))),
          which_(std::move(which)), requested_(requested), in_use_(in_use), limit_(limit) {}

    /// "model <name>" or "global".
    [[nodiscard]] const std::string& which() const noexcept { return which_; }
    [[nodiscard]] std::size_t requested() const noexcept { return requested_; }
    [[nodiscard]] std::size_t in_use() const noexcept { return in_use_; }
    [[nodiscard]] std::size_t limit() const noexcept { return limit_; }

private:
    std::string which_;
    std::size_t requested_;
    std::size_t in_use_;
    std::size_t limit_;
};

/// A KV cache has too few free blocks for a request: blocks needed, free, and the maximum.
class out_of_blocks : public error {
public:
    out_of_blocks(std::size_t needed, std::size_t free, std::size_t max_blocks)
        : error("out of KV blocks: " + std::to_string(needed) + " needed, " + std::to_string(free) + " free of " +
                std::to_string(max_blocks)),
          needed_(needed), free_(free), max_blocks_(max_blocks) {}

    [[nodiscard]] std::size_t needed() const noexcept { return needed_; }
    [[nodiscard]] std::size_t free() const noexcept { return free_; }
    [[nodiscard]] std::size_t max_blocks() const noexcept { return max_blocks_; }

private:
    std::size_t needed_;
    std::size_t free_;
    std::size_t max_blocks_;
};

/// Memory the pool took out of service after the driver failed to give it back (a failed
/// cuMemUnmap or cuMemRelease): it may still be mapped, so it is never mapped, handed out or
/// given back again. Names the range; the pool's statistics count it (retired_units).
class retired_memory : public error {
public:
    retired_memory(std::size_t offset, std::size_t bytes)
        : error("the memory at offset " + std::to_string(offset) + " (" + std::to_string(bytes) +
                " bytes) was retired after the driver failed to give it back; it is never used again"),
          offset_(offset), bytes_(bytes) {}

    [[nodiscard]] std::size_t offset() const noexcept { return offset_; }
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

private:
    std::size_t offset_;
    std::size_t bytes_;
};

/// The caller asked for something that can never succeed: misaligned or out-of-range sizes,
/// a range in the wrong state, an unknown id. The object it was asked of is unchanged.
class invalid_argument : public error {
public:
    using error::error;
};

} // namespace vmmpp
