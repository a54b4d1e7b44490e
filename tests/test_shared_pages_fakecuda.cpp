// The sending side of interop/shared_pages.hpp over the fake CUDA driver (CI runs these for
// real): exported descriptors are close-on-exec; a sender whose peer does not read gives up
// after its timeout, naming it, and closes every descriptor; a pool keeps committing while its
// pages are being sent to a slow peer (review 2, G2: the send held the pool's lock, with no
// deadline); what is sent arrives whole, each descriptor the page's own memory.
#define BOOST_TEST_MODULE shared pages on the fake driver
#include "support/cpu_main.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include "support/fakecuda.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/interop/shared_pages.hpp"
#include "vmmpp/pool.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using namespace std::chrono_literals;

namespace {

/// The fake's allocation granularity (64 KiB by default): one handle.
std::size_t granule() { return vmmpp::vmm_granularity(0); }

std::size_t open_fds() {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
        ++n;
    }
    return n;
}

bool contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

/// A connected socket pair whose sending end buffers as little as the kernel allows, so that a
/// few page records fill it and the sender must wait for the peer.
struct socket_pair {
    int owner = -1;
    int importer = -1;
    socket_pair() {
        int sv[2];
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        owner = sv[0];
        importer = sv[1];
        const int smallest = 1;  // raised to the kernel's minimum (a few KiB)
        BOOST_REQUIRE(::setsockopt(owner, SOL_SOCKET, SO_SNDBUF, &smallest, sizeof smallest) == 0);
    }
    socket_pair(const socket_pair&) = delete;
    socket_pair& operator=(const socket_pair&) = delete;
    ~socket_pair() {
        ::close(owner);
        ::close(importer);
    }
};

using pages_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::unlimited>;

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(shared_pages_on_the_fake_driver, fakecuda::clean_driver)

// The fake exports descriptors without O_CLOEXEC, as a driver may: vmmpp sets it, so a program
// another thread fork+execs meanwhile inherits no access to the pool's memory.
BOOST_AUTO_TEST_CASE(exported_descriptors_are_close_on_exec) {
    const std::size_t g = granule();
    vmmpp::vmm b(8 * g);
    b.commit(0, 2 * g);
    b.commit(5 * g, g);
    const auto exported = b.export_handles();
    BOOST_TEST_REQUIRE(exported.size() == 2u);
    for (const auto& h : exported) {
        const int flags = ::fcntl(h.fd.get(), F_GETFD);
        BOOST_TEST(flags >= 0);
        BOOST_TEST((flags & FD_CLOEXEC) != 0, "descriptor of the handle at " << h.offset << " is inherited by exec");
    }
}

BOOST_AUTO_TEST_CASE(a_peer_that_does_not_read_is_given_up_after_the_timeout) {
    const std::size_t g = granule();
    const std::size_t pages = 128;  // far more records than the socket buffers
    vmmpp::vmm b(pages * g);
    for (std::size_t p = 0; p < pages; ++p) {
        b.commit(p * g, g);  // one handle each
    }
    const std::size_t before = open_fds();
    {
        socket_pair sockets;
        auto sending = std::async(std::launch::async, [&] {
            const auto start = std::chrono::steady_clock::now();
            try {
                vmmpp::send_shared_pages(sockets.owner, b, {.timeout = 300ms});
                BOOST_ERROR("the send completed although the peer read nothing");
            } catch (const vmmpp::shared_pages_send_timeout& e) {
                BOOST_TEST((e.timeout() == 300ms));
                BOOST_TEST(e.count() == pages);
                BOOST_TEST(e.sent() < pages);
                BOOST_TEST(contains(e.what(), "of the " + std::to_string(pages) + " page records"), e.what());
                BOOST_TEST(contains(e.what(), "300 ms"), e.what());
            }
            return std::chrono::steady_clock::now() - start;
        });
        if (sending.wait_for(10s) != std::future_status::ready) {
            BOOST_ERROR("the sender was still blocked after 10 s");
            ::shutdown(sockets.importer, SHUT_RDWR);  // wakes it (EPIPE)
        }
        const auto took = sending.get();
        BOOST_TEST((took >= 300ms));
    }
    BOOST_TEST(open_fds() == before);  // every exported descriptor closed, the sockets too
}

// A peer that takes nothing for stall_timeout is given up long before the whole timeout: what
// bounds a send made under the pool's lock (with_backing), as a caller may still do.
BOOST_AUTO_TEST_CASE(a_peer_that_stalls_is_given_up_after_the_stall_timeout) {
    const std::size_t g = granule();
    const std::size_t pages = 128;
    vmmpp::vmm b(pages * g);
    for (std::size_t p = 0; p < pages; ++p) {
        b.commit(p * g, g);
    }
    socket_pair sockets;
    const auto start = std::chrono::steady_clock::now();
    try {
        vmmpp::send_shared_pages(sockets.owner, b, {.timeout = 30s, .stall_timeout = 200ms});
        BOOST_ERROR("the send completed although the peer read nothing");
    } catch (const vmmpp::shared_pages_send_timeout& e) {
        BOOST_TEST((e.timeout() == 200ms));
        BOOST_TEST(e.sent() < pages);
    }
    const auto took = std::chrono::steady_clock::now() - start;
    BOOST_TEST((took >= 200ms && took < 5s));
}

// Review 2, G2: the pages were sent under the pool's lock, so every commit waited for the peer.
BOOST_AUTO_TEST_CASE(a_pool_commits_while_its_pages_go_to_a_slow_peer) {
    const std::size_t g = granule();
    const std::size_t pages = 128;
    vmmpp::elastic_pool<pages_config> pool((pages + 1) * g, {.device = 0});
    for (std::size_t p = 0; p < pages; ++p) {
        pool.ensure_committed(p * g, g);
    }
    socket_pair sockets;
    auto sending = std::async(std::launch::async, [&] {  // no Boost.Test check here: it is not thread safe
        try {
            vmmpp::send_shared_pages(sockets.owner, pool, {.timeout = 2s, .stall_timeout = 2s});
        } catch (const vmmpp::shared_pages_send_timeout&) {
            return true;
        }
        return false;
    });
    BOOST_TEST_REQUIRE((sending.wait_for(200ms) == std::future_status::timeout));  // waiting for the peer
    // The engine's next append, meanwhile.
    auto committing = std::async(std::launch::async, [&] { pool.ensure_committed(pages * g, g); });
    const bool committed_meanwhile = committing.wait_for(1s) == std::future_status::ready;
    const bool still_sending = sending.wait_for(0s) == std::future_status::timeout;
    BOOST_TEST(committed_meanwhile, "the commit waited for the sender");
    BOOST_TEST(still_sending);
    if (sending.wait_for(10s) != std::future_status::ready) {
        BOOST_ERROR("the sender was still blocked after 10 s");
        ::shutdown(sockets.importer, SHUT_RDWR);  // wakes it (EPIPE)
    }
    BOOST_TEST(sending.get());  // gave up at the timeout
    committing.get();
    BOOST_TEST(pool.is_committed(pages * g, g));
}

BOOST_AUTO_TEST_CASE(what_is_sent_arrives_whole_through_a_small_buffer) {
    const std::size_t g = granule();
    const std::size_t pages = 64;
    vmmpp::elastic_pool<pages_config> pool(2 * pages * g, {.device = 0});
    for (std::size_t p = 0; p < pages; ++p) {
        pool.ensure_committed(2 * p * g, g);  // every other page: 64 handles
        std::memset(pool.base() + 2 * p * g, static_cast<int>(p + 1), g);
    }
    socket_pair sockets;
    auto sending = std::async(std::launch::async, [&] { vmmpp::send_shared_pages(sockets.owner, pool); });
    std::size_t capacity = 0;
    std::size_t received = 0;
    std::size_t wrong = 0;
    vmmpp::detail::receive_shared_pages(
        sockets.importer, {}, g, [&](const vmmpp::detail::shared_pages_header& h) { capacity = h.capacity; },
        [&](const vmmpp::detail::shared_page_record& r, vmmpp::detail::unique_fd fd) {
            // The descriptor is the page's memory: it reads what the pool wrote there.
            void* m = ::mmap(nullptr, r.bytes, PROT_READ, MAP_SHARED, fd.get(), 0);
            BOOST_REQUIRE(m != MAP_FAILED);
            const auto expected = static_cast<unsigned char>(r.offset / (2 * g) + 1);
            wrong += r.offset != received * 2 * g || r.bytes != g ||
                     static_cast<const unsigned char*>(m)[r.bytes - 1] != expected;
            ::munmap(m, r.bytes);
            ++received;
        });
    sending.get();
    BOOST_TEST(capacity == pool.capacity());
    BOOST_TEST(received == pages);
    BOOST_TEST(wrong == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
