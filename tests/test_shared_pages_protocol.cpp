// The socket protocol of interop/shared_pages.hpp, without a GPU: a fake peer on the other end of
// a socket pair sends what a broken or hostile owner would (descriptors where none belong, more
// records than it sends, more than the span holds), and the receiving side must refuse it in
// time, with a typed error, closing every descriptor it got. Also the peer check (SO_PEERCRED).
#define BOOST_TEST_MODULE shared_pages_protocol
#include "support/cpu_main.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <future>
#include <optional>
#include <string>
#include <vector>

#include "vmmpp/interop/shared_pages.hpp"

namespace {

using namespace std::chrono_literals;
using vmmpp::detail::shared_page_record;
using vmmpp::detail::shared_pages_header;

constexpr std::size_t page = std::size_t{2} << 20;  // the receiver's smallest page in these tests

/// Descriptors open in this process now.
std::size_t open_fds() {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
        ++n;
    }
    return n;
}

/// A connected socket pair: `owner` plays the peer that sends, `importer` is received on.
struct socket_pair {
    int owner = -1;
    int importer = -1;
    socket_pair() {
        int sv[2];
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        owner = sv[0];
        importer = sv[1];
    }
    socket_pair(const socket_pair&) = delete;
    socket_pair& operator=(const socket_pair&) = delete;
    ~socket_pair() {
        ::close(owner);
        ::close(importer);
    }
};

/// Sends one message with any number of descriptors attached, as a peer may.
void send_with(int socket, const void* data, std::size_t bytes, const std::vector<int>& fds) {
    iovec iov{const_cast<void*>(data), bytes};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> control(CMSG_SPACE(fds.size() * sizeof(int)));
    if (!fds.empty()) {
        msg.msg_control = control.data();
        msg.msg_controllen = control.size();
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
        std::memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
    }
    BOOST_REQUIRE(::sendmsg(socket, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes));
}

void send_header(int socket, std::uint64_t capacity, std::uint64_t count, const std::vector<int>& fds = {}) {
    const shared_pages_header header{shared_pages_header{}.magic, capacity, count};
    send_with(socket, &header, sizeof header, fds);
}

void send_record(int socket, std::uint64_t offset, std::uint64_t bytes, const std::vector<int>& fds) {
    const shared_page_record record{offset, bytes};
    send_with(socket, &record, sizeof record, fds);
}

/// A descriptor to send (its own inode, to recognise it on the other side).
int new_fd() {
    const int fd = ::memfd_create("vmmpp-test-page", MFD_CLOEXEC);
    BOOST_REQUIRE(fd >= 0);
    return fd;
}

/// The inode behind a descriptor; 0 if it is not open.
ino_t inode_of(int fd) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

/// What the receiving side reported.
struct received {
    std::optional<shared_pages_header> header;
    std::vector<shared_page_record> records;
    std::vector<ino_t> inodes;
};

/// Runs the receiving side on `socket` as imported_pages does, minus the driver calls.
received receive(int socket, const vmmpp::shared_pages_options& options = {}) {
    received r;
    vmmpp::detail::receive_shared_pages(
        socket, options, page, [&](const shared_pages_header& h) { r.header = h; },
        [&](const shared_page_record& record, vmmpp::detail::unique_fd fd) {
            r.records.push_back(record);
            r.inodes.push_back(inode_of(fd.get()));
        });
    return r;
}

/// `receive` on a thread, so that a receiver that never returns fails the test instead of
/// hanging it: after 10 s the socket is shut down, which wakes it. Throws what it threw.
received receive_within(int socket, const vmmpp::shared_pages_options& options = {}) {
    auto done = std::async(std::launch::async, [&] { return receive(socket, options); });
    if (done.wait_for(10s) != std::future_status::ready) {
        BOOST_ERROR("the receiver was still waiting after 10 s");
        ::shutdown(socket, SHUT_RDWR);
    }
    return done.get();
}

bool message_has(const std::exception& e, const std::string& text) {
    return std::string(e.what()).find(text) != std::string::npos;
}

constexpr uid_t other_user = 65534;

boost::test_tools::assertion_result running_as_root(boost::unit_test::test_unit_id) {
    boost::test_tools::assertion_result root(::geteuid() == 0);
    root.message() << "needs root: its peer runs as another user (uid " << other_user << ")";
    return root;
}

} // namespace

BOOST_AUTO_TEST_CASE(a_well_formed_transfer_arrives_whole_and_leaves_no_descriptor_open) {
    const std::size_t before = open_fds();
    {
        socket_pair sockets;
        const int a = new_fd();
        const int b = new_fd();
        send_header(sockets.owner, 8 * page, 2);
        send_record(sockets.owner, 0, 2 * page, {a});
        send_record(sockets.owner, 6 * page, page, {b});
        const auto r = receive_within(sockets.importer);
        BOOST_REQUIRE(r.header.has_value());
        BOOST_TEST(r.header->capacity == 8 * page);
        BOOST_REQUIRE(r.records.size() == 2u);
        BOOST_TEST(r.records[1].offset == 6 * page);
        BOOST_TEST(r.records[1].bytes == page);
        BOOST_TEST(r.inodes[0] == inode_of(a));  // the descriptor the peer sent with each record
        BOOST_TEST(r.inodes[1] == inode_of(b));
        ::close(a);
        ::close(b);
    }
    BOOST_TEST(open_fds() == before);
}

BOOST_AUTO_TEST_CASE(descriptors_where_none_belong_are_refused_and_closed) {
    const std::size_t before = open_fds();
    auto check = [&](const std::string& what, const std::string& expected, auto send) {
        {
            socket_pair sockets;
            send(sockets.owner);
            BOOST_CHECK_EXCEPTION(receive_within(sockets.importer), vmmpp::invalid_argument,
                                  [&](const vmmpp::invalid_argument& e) { return message_has(e, expected); });
        }
        BOOST_TEST(open_fds() == before, what << ": descriptors left open");
    };
    check("a descriptor with the header", "descriptors to the header", [](int owner) {
        const int fd = new_fd();
        send_header(owner, 8 * page, 0, {fd});
        ::close(fd);
    });
    check("two descriptors with a record", "came with 2 descriptors", [](int owner) {
        const int a = new_fd();
        const int b = new_fd();
        send_header(owner, 8 * page, 1);
        send_record(owner, 0, page, {a, b});
        ::close(a);
        ::close(b);
    });
    check("a record without a descriptor", "came with 0 descriptors", [](int owner) {
        send_header(owner, 8 * page, 1);
        send_record(owner, 0, page, {});
    });
    check("more descriptors than a message carries", "more than", [](int owner) {
        std::vector<int> fds;
        for (int i = 0; i < 16; ++i) {
            fds.push_back(new_fd());
        }
        send_header(owner, 8 * page, 1);
        send_record(owner, 0, page, fds);
        for (const int fd : fds) {
            ::close(fd);
        }
    });
    check("a record beyond the span", "lies beyond the span", [](int owner) {
        const int fd = new_fd();
        send_header(owner, 8 * page, 1);
        send_record(owner, 7 * page, 2 * page, {fd});
        ::close(fd);
    });
}

BOOST_AUTO_TEST_CASE(a_peer_that_stops_sending_is_given_up_after_the_timeout) {
    const vmmpp::shared_pages_options quick{.timeout = 200ms};
    {
        // It announces many records and sends none.
        socket_pair sockets;
        send_header(sockets.owner, 1000 * page, 1000);
        const auto start = std::chrono::steady_clock::now();
        BOOST_CHECK_EXCEPTION(receive_within(sockets.importer, quick), vmmpp::shared_pages_timeout,
                              [](const vmmpp::shared_pages_timeout& e) {
                                  return e.received() == 0 && e.announced() == std::optional<std::uint64_t>(1000) &&
                                         e.timeout() == 200ms;
                              });
        BOOST_TEST((std::chrono::steady_clock::now() - start >= 200ms));
    }
    {
        // It sends two and stalls: the deadline covers the whole transfer.
        const std::size_t before = open_fds();
        {
            socket_pair sockets;
            const int a = new_fd();
            send_header(sockets.owner, 1000 * page, 1000);
            send_record(sockets.owner, 0, page, {a});
            send_record(sockets.owner, page, page, {a});
            ::close(a);
            BOOST_CHECK_EXCEPTION(receive_within(sockets.importer, quick), vmmpp::shared_pages_timeout,
                                  [](const vmmpp::shared_pages_timeout& e) { return e.received() == 2; });
        }
        BOOST_TEST(open_fds() == before);
    }
    {
        // It sends nothing at all, or half a header.
        socket_pair sockets;
        const char half[5] = {};
        send_with(sockets.owner, half, sizeof half, {});
        BOOST_CHECK_EXCEPTION(receive_within(sockets.importer, quick), vmmpp::shared_pages_timeout,
                              [](const vmmpp::shared_pages_timeout& e) { return !e.announced().has_value(); });
    }
}

BOOST_AUTO_TEST_CASE(the_record_count_is_bounded_by_what_the_span_holds) {
    socket_pair sockets;
    send_header(sockets.owner, 64 * page, std::uint64_t{1} << 40);
    const auto start = std::chrono::steady_clock::now();
    BOOST_CHECK_EXCEPTION(receive_within(sockets.importer), vmmpp::invalid_argument,
                          [](const vmmpp::invalid_argument& e) { return message_has(e, "holds at most 64"); });
    BOOST_TEST((std::chrono::steady_clock::now() - start < 5s));  // refused at once, not after the timeout
}

BOOST_AUTO_TEST_CASE(a_peer_of_another_user_is_refused_on_either_side) {
    socket_pair sockets;
    send_header(sockets.owner, 8 * page, 0);
    const uid_t self = ::geteuid();
    auto wrong = [&](const vmmpp::untrusted_socket_peer& e) {
        return e.expected_uid() == self + 1 && e.peer_uid() == self && e.peer_pid() == ::getpid() &&
               message_has(e, "runs as uid " + std::to_string(self));
    };
    const vmmpp::shared_pages_options expecting_another{.peer_uid = self + 1};
    BOOST_CHECK_EXCEPTION(receive_within(sockets.importer, expecting_another), vmmpp::untrusted_socket_peer, wrong);
    // The sender's check, before it exports anything.
    BOOST_CHECK_EXCEPTION(vmmpp::detail::check_peer(sockets.owner, self + 1), vmmpp::untrusted_socket_peer, wrong);
    BOOST_CHECK_NO_THROW(vmmpp::detail::check_peer(sockets.owner, self));
    // Refused before anything was read: the header is still there for a receiver that trusts the peer.
    BOOST_TEST(receive_within(sockets.importer, {.peer_uid = self}).header.has_value());
}

BOOST_AUTO_TEST_CASE(a_peer_running_as_another_user_is_refused, *boost::unit_test::precondition(running_as_root)) {
    // A listening socket (abstract, for the test only: a real one belongs in a private
    // directory) and a child that connects to it as another user and sends an empty transfer.
    const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    BOOST_REQUIRE(listener >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string name = "vmmpp-test-peer-" + std::to_string(::getpid());
    std::memcpy(address.sun_path + 1, name.data(), name.size());
    const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    BOOST_REQUIRE(::bind(listener, reinterpret_cast<const sockaddr*>(&address), length) == 0);
    BOOST_REQUIRE(::listen(listener, 1) == 0);
    const pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
        const int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
        if (::setgid(other_user) != 0 || ::setuid(other_user) != 0 ||
            ::connect(s, reinterpret_cast<const sockaddr*>(&address), length) != 0) {
            ::_exit(1);
        }
        const shared_pages_header header{shared_pages_header{}.magic, 8 * page, 0};
        ::_exit(::send(s, &header, sizeof header, 0) == static_cast<ssize_t>(sizeof header) ? 0 : 2);
    }
    const int connection = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    BOOST_REQUIRE(connection >= 0);
    int status = 0;
    BOOST_REQUIRE(::waitpid(child, &status, 0) == child);
    BOOST_REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    BOOST_CHECK_EXCEPTION(receive_within(connection, {.peer_uid = ::geteuid()}), vmmpp::untrusted_socket_peer,
                          [&](const vmmpp::untrusted_socket_peer& e) {
                              return e.peer_uid() == other_user && e.peer_pid() == child;
                          });
    BOOST_TEST(receive_within(connection, {.peer_uid = other_user}).header.has_value());
    ::close(connection);
    ::close(listener);
}
