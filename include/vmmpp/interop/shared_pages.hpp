// vmmpp/interop/shared_pages.hpp: the same KV pages mapped in two processes (prefill in one,
// decode in another, on one host). The owner exports its vmm pool's physical handles as POSIX
// file descriptors and sends them over a Unix socket (SCM_RIGHTS); the receiver imports them and
// maps them at the same offsets of a span of its own, so block ids and offsets mean the same.
// Whoever is at the other end of the socket gets read/write access to every page (or hands the
// receiver pages of its choosing): the socket must be private to the two processes (a socket
// pair, or a path in a directory only their user may enter, not the abstract namespace), and
// shared_pages_options::peer_uid makes each side check who the other is.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vmmpp/backing/concept.hpp"
#include "vmmpp/backing/vmm.hpp"
#include "vmmpp/detail/unique_fd.hpp"
#include "vmmpp/driver/context.hpp"
#include "vmmpp/driver/handles.hpp"
#include "vmmpp/error.hpp"

namespace vmmpp {

/// How shared pages are sent and received.
struct shared_pages_options {
    /// The longest either side waits for the whole transfer: the receiver for the header and
    /// every page (else vmmpp::shared_pages_timeout), the sender for the peer to take them (else
    /// vmmpp::shared_pages_send_timeout), so a stuck or hostile peer cannot hold either forever.
    std::chrono::milliseconds timeout{10000};
    /// The longest the sender waits for the peer to take the next record: a live reader takes
    /// records as fast as it maps them, so a peer that takes nothing for this long is stuck, and
    /// the sender (perhaps called under its pool's lock, see send_shared_pages) gives up
    /// (vmmpp::shared_pages_send_timeout) before the whole `timeout`.
    std::chrono::milliseconds stall_timeout{1000};
    /// The user the peer must run as, checked by either side before anything is sent or received
    /// (SO_PEERCRED: the user that made the socket pair or connected). None: no check.
    std::optional<uid_t> peer_uid{};
};

/// The peer of a shared-pages socket runs as another user than the one expected.
class untrusted_socket_peer : public error {
public:
    untrusted_socket_peer(uid_t expected, uid_t peer, pid_t peer_pid)
        : error("shared pages: the peer (pid " + std::to_string(peer_pid) + ") runs as uid " + std::to_string(peer) +
                ", not the expected uid " + std::to_string(expected) + ": refused"),
          expected_(expected), peer_(peer), peer_pid_(peer_pid) {}

    [[nodiscard]] uid_t expected_uid() const noexcept { return expected_; }
    [[nodiscard]] uid_t peer_uid() const noexcept { return peer_; }
    [[nodiscard]] pid_t peer_pid() const noexcept { return peer_pid_; }

private:
    uid_t expected_;
    uid_t peer_;
    pid_t peer_pid_;
};

/// The peer did not send all it announced within the receiver's timeout.
class shared_pages_timeout : public error {
public:
    /// `announced` is empty when not even the header came.
    shared_pages_timeout(std::chrono::milliseconds timeout, std::uint64_t received, std::optional<std::uint64_t> announced)
        : error("shared pages: " +
                (announced ? "the peer sent " + std::to_string(received) + " of the " + std::to_string(*announced) +
                                 " page records it announced"
                           : std::string("the peer sent no whole header")) +
                " within the timeout of " + std::to_string(timeout.count()) + " ms"),
          timeout_(timeout), received_(received), announced_(announced) {}

    [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return timeout_; }
    /// Page records received before the time ran out.
    [[nodiscard]] std::uint64_t received() const noexcept { return received_; }
    /// Page records the header announced; empty if no header came.
    [[nodiscard]] std::optional<std::uint64_t> announced() const noexcept { return announced_; }

private:
    std::chrono::milliseconds timeout_;
    std::uint64_t received_;
    std::optional<std::uint64_t> announced_;
};

/// The peer did not take all the sender had to send within the sender's timeout. The socket is
/// left in the middle of the transfer: close it (the receiver then fails too).
class shared_pages_send_timeout : public error {
public:
    shared_pages_send_timeout(std::chrono::milliseconds timeout, std::uint64_t sent, std::uint64_t count)
        : error("shared pages: the peer took " + std::to_string(sent) + " of the " + std::to_string(count) +
                " page records within the sender's timeout of " + std::to_string(timeout.count()) +
                " ms; the transfer is incomplete"),
          timeout_(timeout), sent_(sent), count_(count) {}

    [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return timeout_; }
    /// Page records sent whole before the time ran out (0 also if the header did not go).
    [[nodiscard]] std::uint64_t sent() const noexcept { return sent_; }
    /// Page records there were to send.
    [[nodiscard]] std::uint64_t count() const noexcept { return count_; }

private:
    std::chrono::milliseconds timeout_;
    std::uint64_t sent_;
    std::uint64_t count_;
};

/// A vmm backing's committed pages, exported (export_shared_pages) and not yet sent: the span's
/// size and one descriptor per physical handle, owned here (closed when this goes). Holding it
/// keeps the handles' memory alive, as a descriptor in flight does.
struct shared_pages_export {
    std::size_t capacity = 0;
    std::vector<exported_handle> handles;
};

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

/// Throws vmmpp::untrusted_socket_peer unless the peer of `socket` runs as `expected` (if set).
inline void check_peer(int socket, const std::optional<uid_t>& expected) {
    if (!expected) {
        return;
    }
    ucred peer{};
    socklen_t length = sizeof peer;
    if (::getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0) {
        throw socket_error("getsockopt(SO_PEERCRED) (is it a connected Unix socket?)");
    }
    if (peer.uid != *expected) {
        throw untrusted_socket_peer(*expected, peer.uid, peer.pid);
    }
}

/// Sends all `bytes` of `data`, with `fd` attached when it is not -1, before `deadline`; false if
/// the deadline passes first (the message may then be partly sent). Never blocks past it: the
/// socket is polled and written with MSG_DONTWAIT, whatever its own blocking mode.
inline bool send_message(int socket, const void* data, std::size_t bytes, int fd,
                         std::chrono::steady_clock::time_point deadline) {
    std::size_t sent = 0;
    while (sent < bytes) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            return false;
        }
        pollfd p{socket, POLLOUT, 0};
        const int ready = ::poll(&p, 1, static_cast<int>(std::min<std::chrono::milliseconds::rep>(left.count(), INT_MAX)));
        if (ready < 0 && errno != EINTR) {
            throw socket_error("poll");
        }
        if (ready <= 0) {
            continue;  // the deadline is checked again
        }
        // POLLERR / POLLHUP: sendmsg below reports the error (EPIPE, ECONNRESET).
        iovec iov{const_cast<std::byte*>(static_cast<const std::byte*>(data)) + sent, bytes - sent};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))]{};
        if (fd >= 0 && sent == 0) {  // a stream socket delivers the descriptor with the first bytes sent
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
        }
        const ssize_t n = ::sendmsg(socket, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) {
                continue;
            }
            throw socket_error("sendmsg");
        }
        sent += static_cast<std::size_t>(n);
    }
    return true;
}

/// Sends `pages` (the header, then one record per handle with its descriptor), all before
/// `options.timeout` has passed, else vmmpp::shared_pages_send_timeout. The peer is not checked here.
inline void send_exported_pages(int socket, const shared_pages_export& pages, const shared_pages_options& options) {
    const auto deadline = std::chrono::steady_clock::now() + options.timeout;
    const std::uint64_t count = pages.handles.size();
    const shared_pages_header header{shared_pages_header{}.magic, pages.capacity, count};
    if (!send_message(socket, &header, sizeof header, -1, deadline)) {
        throw shared_pages_send_timeout(options.timeout, 0, count);
    }
    for (std::uint64_t i = 0; i < count; ++i) {
        const exported_handle& h = pages.handles[i];
        const shared_page_record record{h.offset, h.bytes};
        const auto stalled = std::chrono::steady_clock::now() + options.stall_timeout;
        if (!send_message(socket, &record, sizeof record, h.fd.get(), std::min(deadline, stalled))) {
            throw shared_pages_send_timeout(std::chrono::steady_clock::now() >= deadline ? options.timeout
                                                                                         : options.stall_timeout,
                                            i, count);
        }
    }
}

/// Receives exactly `bytes` into `data` and adds every descriptor that comes with them to `fds`,
/// however many the peer attached (so that none leaks: the caller decides what it expected).
/// Returns false if `deadline` passes first. Throws if the peer closes the socket early, or if
/// the descriptors did not fit (MSG_CTRUNC: the kernel closed those that did not).
inline bool receive_message(int socket, void* data, std::size_t bytes, std::chrono::steady_clock::time_point deadline,
                            std::vector<unique_fd>& fds) {
    constexpr std::size_t most_fds = 4;  // one is expected; a few more are taken (and closed) to report them
    std::size_t got = 0;
    while (got < bytes) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            return false;
        }
        pollfd p{socket, POLLIN, 0};
        const int ready = ::poll(&p, 1, static_cast<int>(std::min<std::chrono::milliseconds::rep>(left.count(), INT_MAX)));
        if (ready < 0 && errno != EINTR) {
            throw socket_error("poll");
        }
        if (ready <= 0) {
            continue;  // the deadline is checked again
        }
        iovec iov{static_cast<std::byte*>(data) + got, bytes - got};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(most_fds * sizeof(int))]{};
        fds.reserve(fds.size() + most_fds);  // so that taking what arrives cannot throw
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        const ssize_t n = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) {
                continue;
            }
            throw socket_error("recvmsg");
        }
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (std::size_t i = 0; i < count; ++i) {
                    int fd = -1;
                    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                    fds.emplace_back(fd);
                }
            }
        }
        if ((msg.msg_flags & MSG_CTRUNC) != 0) {
            throw invalid_argument("shared pages: the peer attached more than " + std::to_string(most_fds) +
                                   " descriptors to one message");
        }
        if (n == 0) {
            throw error("shared pages: the peer closed the socket early");
        }
        got += static_cast<std::size_t>(n);
    }
    return true;
}

/// The receiving side of the protocol, with no CUDA in it: checks the peer, receives the header
/// and passes it to `on_header`, then each page record with its descriptor to `on_page`
/// (which takes the descriptor; it is closed when dropped). Everything must arrive within
/// `options.timeout` (else vmmpp::shared_pages_timeout). The header may announce at most
/// capacity / `page_bytes` records (the smallest page the receiver maps), each record must come
/// with exactly one descriptor and lie in the span (else vmmpp::invalid_argument); every
/// descriptor received is closed on every path.
template <class OnHeader, class OnPage>
void receive_shared_pages(int socket, const shared_pages_options& options, std::size_t page_bytes,
                          OnHeader&& on_header, OnPage&& on_page) {
    check_peer(socket, options.peer_uid);
    const auto deadline = std::chrono::steady_clock::now() + options.timeout;
    shared_pages_header header;
    std::vector<unique_fd> fds;
    if (!receive_message(socket, &header, sizeof header, deadline, fds)) {
        throw shared_pages_timeout(options.timeout, 0, std::nullopt);
    }
    if (!fds.empty()) {
        throw invalid_argument("shared pages: the peer attached " + std::to_string(fds.size()) +
                               " descriptors to the header, which carries none");
    }
    if (header.magic != shared_pages_header{}.magic) {
        throw invalid_argument("shared pages: the peer did not send vmmpp shared pages");
    }
    const std::uint64_t most = header.capacity / std::max<std::size_t>(page_bytes, 1);
    if (header.count > most) {
        throw invalid_argument("shared pages: the peer announced " + std::to_string(header.count) +
                               " pages, but a span of " + std::to_string(header.capacity) + " bytes holds at most " +
                               std::to_string(most) + " of " + std::to_string(page_bytes) + " bytes");
    }
    on_header(std::as_const(header));
    for (std::uint64_t i = 0; i < header.count; ++i) {
        shared_page_record record;
        fds.clear();
        if (!receive_message(socket, &record, sizeof record, deadline, fds)) {
            throw shared_pages_timeout(options.timeout, i, header.count);
        }
        if (fds.size() != 1) {
            throw invalid_argument("shared pages: page record " + std::to_string(i) + " came with " +
                                   std::to_string(fds.size()) + " descriptors, not 1");
        }
        if (record.bytes == 0 || record.offset > header.capacity || record.bytes > header.capacity - record.offset) {
            throw invalid_argument("shared pages: page record " + std::to_string(i) + " ([" +
                                   std::to_string(record.offset) + ", +" + std::to_string(record.bytes) +
                                   ")) lies beyond the span of " + std::to_string(header.capacity) + " bytes");
        }
        on_page(std::as_const(record), std::move(fds.front()));
    }
}

} // namespace detail

/// Exports a vmm backing's committed pages (every handle as a close-on-exec descriptor) for
/// send_shared_pages. Cheap (one driver call per handle, no I/O): a pool's caller does it under
/// the pool's lock (elastic_pool::with_backing) and sends after letting go of the lock, so that a
/// slow peer never holds up the pool's commits. Pages committed later are not in it; pages
/// decommitted later stay alive (the descriptors hold them) until the export and the
/// receiver's imports are gone.
template <handle_exporting_backing Backing>
[[nodiscard]] shared_pages_export export_shared_pages(const Backing& backing) {
    return shared_pages_export{backing.capacity(), backing.export_handles()};
}

/// Sends exported pages over a connected Unix socket, after checking the peer
/// (`options.peer_uid`, vmmpp::untrusted_socket_peer): whoever it is gets read/write access to
/// every page. Gives up after `options.timeout` (vmmpp::shared_pages_send_timeout, naming how
/// many records went). The descriptors stay `pages`'s (closed when it goes).
inline void send_shared_pages(int socket, const shared_pages_export& pages, const shared_pages_options& options = {}) {
    detail::check_peer(socket, options.peer_uid);
    detail::send_exported_pages(socket, pages, options);
}

/// Sends a vmm backing's committed pages (its span size and every handle): checks the peer, then
/// exports and sends as above. For a backing nothing else commits to meanwhile; for a pool's
/// backing use the pool overload, which does not hold the pool's lock while sending.
template <handle_exporting_backing Backing>
void send_shared_pages(int socket, const Backing& backing, const shared_pages_options& options = {}) {
    detail::check_peer(socket, options.peer_uid);  // before anything is exported
    detail::send_exported_pages(socket, export_shared_pages(backing), options);
}

/// Sends the committed pages of a pool over a vmm backing: checks the peer, exports under the
/// pool's lock (elastic_pool::with_backing), and sends with the lock released, so the pool's
/// commits and releases go on while a slow peer reads (they would wait up to `options.timeout`
/// otherwise).
template <class Pool>
    requires handle_exporting_backing<typename Pool::backing_type> &&
             requires(const Pool& pool) { { pool.backing() } -> std::same_as<const typename Pool::backing_type&>; }
void send_shared_pages(int socket, const Pool& pool, const shared_pages_options& options = {}) {
    detail::check_peer(socket, options.peer_uid);
    const shared_pages_export pages =
        pool.with_backing([](const typename Pool::backing_type& b) { return export_shared_pages(b); });
    detail::send_exported_pages(socket, pages, options);
}

/// Another process's pages, imported and mapped at the same offsets of a span reserved here,
/// read/write for `device`. Move-only; unmaps, releases and frees the span on destruction.
class imported_pages {
public:
    /// Receives what send_shared_pages sent on `socket` and maps it. Checks the peer
    /// (`options.peer_uid`, vmmpp::untrusted_socket_peer), gives up after `options.timeout`
    /// (vmmpp::shared_pages_timeout), refuses a peer that breaks the protocol
    /// (vmmpp::invalid_argument), and closes every descriptor it receives.
    imported_pages(int socket, int device, const shared_pages_options& options = {}) : context_(device) {
        scoped_context current(context_);
        const std::size_t granularity = vmm_granularity(device);
        const int access[] = {device};
        try {
            detail::receive_shared_pages(
                socket, options, vmm_granularity(device, false),
                [&](const detail::shared_pages_header& header) {
                    reservation_ = address_reservation(header.capacity, granularity);
                },
                [&](const detail::shared_page_record& record, detail::unique_fd fd) {
                    piece p;
                    p.memory = physical_allocation::import_fd(fd.get(), record.bytes);
                    fd.reset();  // the imported handle keeps the memory
                    p.map = mapping(reservation_.base() + record.offset, p.memory, access);
                    pieces_.emplace(record.offset, std::move(p));
                });
        } catch (...) {
            // Unmapped and freed here, in the context, as the destructor does: the members would
            // otherwise go after `current` has popped it.
            pieces_.clear();
            reservation_.reset();
            throw;
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
