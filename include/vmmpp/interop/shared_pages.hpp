// vmmpp/interop/shared_pages.hpp: the same KV pages mapped in two processes (prefill in one,
// decode in another, on one host). The owner exports its vmm pool's physical handles as POSIX
// file descriptors and sends them over a Unix socket (SCM_RIGHTS); the receiver imports them and
// maps them at the same offsets of a span of its own, so block ids and offsets mean the same.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/handles.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

namespace detail {

struct shared_pages_header {
    std::uint64_t magic = 0x766d6d7070736870ull;  // "vmmppshp"
    std::uint64_t capacity = 0;
    std::uint64_t count = 0;
};
struct shared_page_record {
    std::uint64_t offset = 0;
    std::uint64_t bytes = 0;
};

inline error socket_error(const char* what) {
    return error(std::string("shared pages: ") + what + ": " + std::strerror(errno));
}

/// Sends `bytes` of `data`, with `fd` attached when it is not -1.
inline void send_message(int socket, const void* data, std::size_t bytes, int fd) {
    iovec iov{const_cast<void*>(data), bytes};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))]{};
    if (fd >= 0) {
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    if (::sendmsg(socket, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(bytes)) {
        throw socket_error("sendmsg");
    }
}

/// Receives exactly `bytes` into `data`; returns the attached descriptor or -1.
inline int receive_message(int socket, void* data, std::size_t bytes) {
    iovec iov{data, bytes};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))]{};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t got = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    if (got != static_cast<ssize_t>(bytes)) {
        throw got < 0 ? socket_error("recvmsg") : error("shared pages: the peer closed the socket early");
    }
    int fd = -1;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
        }
    }
    return fd;
}

} // namespace detail

/// Sends a vmm backing's committed pages (its span size and every handle) over a connected Unix
/// socket. The descriptors it exports are closed here once sent.
inline void send_shared_pages(int socket, const vmm& backing) {
    std::vector<exported_handle> handles = backing.export_handles();
    struct closer {
        std::vector<exported_handle>& h;
        ~closer() {
            for (const auto& e : h) {
                ::close(e.fd);
            }
        }
    } close_all{handles};
    const detail::shared_pages_header header{0x766d6d7070736870ull, backing.capacity(), handles.size()};
    detail::send_message(socket, &header, sizeof header, -1);
    for (const auto& h : handles) {
        const detail::shared_page_record record{h.offset, h.bytes};
        detail::send_message(socket, &record, sizeof record, h.fd);
    }
}

/// Another process's pages, imported and mapped at the same offsets of a span reserved here,
/// read/write for `device`. Move-only; unmaps, releases and frees the span on destruction.
class imported_pages {
public:
    /// Receives what send_shared_pages sent on `socket` and maps it.
    imported_pages(int socket, int device) : context_(device) {
        detail::shared_pages_header header;
        (void)detail::receive_message(socket, &header, sizeof header);
        if (header.magic != detail::shared_pages_header{}.magic) {
            throw invalid_argument("shared pages: the peer did not send vmmpp shared pages");
        }
        scoped_context current(context_);
        reservation_ = address_reservation(header.capacity, vmm_granularity(device));
        const int access[] = {device};
        for (std::uint64_t i = 0; i < header.count; ++i) {
            detail::shared_page_record record;
            const int fd = detail::receive_message(socket, &record, sizeof record);
            if (fd < 0) {
                throw error("shared pages: a page record came without its descriptor");
            }
            if (record.offset > header.capacity || record.bytes > header.capacity - record.offset) {
                ::close(fd);
                throw invalid_argument("shared pages: a page lies beyond the span");
            }
            piece p;
            try {
                p.memory = physical_allocation::import_fd(fd, record.bytes);
            } catch (...) {
                ::close(fd);
                throw;
            }
            ::close(fd);  // the imported handle keeps the memory
            p.map = mapping(reservation_.base() + record.offset, p.memory, access);
            pieces_.emplace(record.offset, std::move(p));
        }
    }
    imported_pages(const imported_pages&) = delete;
    imported_pages& operator=(const imported_pages&) = delete;
    ~imported_pages() {
        scoped_context current(context_);
        pieces_.clear();
        reservation_.reset();
    }

    /// The span's first byte: offset o here is offset o in the owner's pool.
    [[nodiscard]] std::byte* base() const noexcept { return reinterpret_cast<std::byte*>(reservation_.base()); }
    [[nodiscard]] std::size_t capacity() const noexcept { return reservation_.bytes(); }
    /// Imported handles, and the bytes they map.
    [[nodiscard]] std::size_t handle_count() const noexcept { return pieces_.size(); }
    [[nodiscard]] std::size_t mapped_bytes() const noexcept {
        std::size_t n = 0;
        for (const auto& [offset, p] : pieces_) {
            n += p.memory.bytes();
        }
        return n;
    }
    /// Whether [offset, offset+bytes) lies in mapped pages.
    [[nodiscard]] bool is_mapped(std::size_t offset, std::size_t bytes) const noexcept {
        std::size_t at = offset;
        const std::size_t end = offset + bytes;
        auto it = pieces_.upper_bound(at);
        if (it == pieces_.begin()) {
            return false;
        }
        --it;
        while (at < end) {
            if (it == pieces_.end() || it->first > at || it->first + it->second.memory.bytes() <= at) {
                return false;
            }
            at = it->first + it->second.memory.bytes();
            ++it;
        }
        return true;
    }

private:
    struct piece {
        physical_allocation memory;  // first: destroyed after the mapping
        mapping map;
    };
    primary_context context_;
    address_reservation reservation_;
    std::map<std::size_t, piece> pieces_;
};

} // namespace vmmpp
