// The host backing, for real: commit makes memory usable, decommit gives resident pages back to
// the OS, every bad input is rejected with the state unchanged.
#define BOOST_TEST_MODULE host backing
#include "support/cpu_main.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "vmmpp/backing/external.hpp"
#include "vmmpp/backing/host.hpp"

namespace {

constexpr std::size_t MiB = std::size_t{1} << 20;

/// Resident OS pages in [p, p+bytes), read with mincore.
std::size_t resident_pages(const std::byte* p, std::size_t bytes) {
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> vec((bytes + page - 1) / page);
    BOOST_REQUIRE_EQUAL(::mincore(const_cast<std::byte*>(p), bytes, vec.data()), 0);
    std::size_t n = 0;
    for (unsigned char v : vec) {
        n += v & 1u;
    }
    return n;
}

} // namespace

BOOST_AUTO_TEST_CASE(commit_makes_memory_usable_and_decommit_returns_it) {
    vmmpp::host h(16 * MiB);
    BOOST_TEST(h.capacity() == 16 * MiB);
    BOOST_TEST(h.granularity() == 2 * MiB);
    BOOST_TEST(h.committed_bytes() == 0u);

    h.commit(4 * MiB, 4 * MiB);
    BOOST_TEST(h.committed_bytes() == 4 * MiB);
    std::memset(h.base() + 4 * MiB, 0xab, 4 * MiB);
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    BOOST_TEST(resident_pages(h.base() + 4 * MiB, 4 * MiB) == 4 * MiB / page);

    h.decommit(4 * MiB, 2 * MiB);
    BOOST_TEST(h.committed_bytes() == 2 * MiB);
    BOOST_TEST(resident_pages(h.base() + 4 * MiB, 2 * MiB) == 0u);
    BOOST_TEST(resident_pages(h.base() + 6 * MiB, 2 * MiB) == 2 * MiB / page);
    BOOST_TEST(static_cast<unsigned char>(h.base()[6 * MiB]) == 0xabu);

    // A recommitted page reads zeros: nothing of its previous contents survives.
    h.commit(4 * MiB, 2 * MiB);
    BOOST_TEST(static_cast<unsigned char>(h.base()[4 * MiB]) == 0u);
    BOOST_TEST(static_cast<unsigned char>(h.base()[6 * MiB - 1]) == 0u);
}

BOOST_AUTO_TEST_CASE(resident_set_falls_after_decommit) {
    auto rss_pages = [] {
        long size = 0, resident = 0;
        FILE* f = std::fopen("/proc/self/statm", "r");
        BOOST_REQUIRE(f != nullptr);
        BOOST_REQUIRE_EQUAL(std::fscanf(f, "%ld %ld", &size, &resident), 2);
        std::fclose(f);
        return resident;
    };
    vmmpp::host h(64 * MiB);
    h.commit(0, 64 * MiB);
    std::memset(h.base(), 1, 64 * MiB);
    const long touched = rss_pages();
    h.decommit(0, 64 * MiB);
    const long after = rss_pages();
    const long page = ::sysconf(_SC_PAGESIZE);
    BOOST_TEST(touched - after >= static_cast<long>(60 * MiB) / page);
}

BOOST_AUTO_TEST_CASE(bad_construction_is_rejected) {
    BOOST_CHECK_THROW(vmmpp::host(0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(vmmpp::host(3 * MiB), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(vmmpp::host(4 * MiB, {.page_bytes = 1000}), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(vmmpp::host(4 * MiB, {.page_bytes = 0}), vmmpp::invalid_argument);
    // Address space the OS cannot give is out_of_memory, not a crash.
    BOOST_CHECK_THROW(vmmpp::host(std::size_t{1} << 62), vmmpp::out_of_memory);
    vmmpp::host small(64 * 1024, {.page_bytes = 4096});
    BOOST_TEST(small.granularity() == 4096u);
}

BOOST_AUTO_TEST_CASE(bad_ranges_are_rejected_and_change_nothing) {
    vmmpp::host h(8 * MiB);
    h.commit(2 * MiB, 2 * MiB);
    h.base()[2 * MiB] = std::byte{42};
    auto unchanged = [&] {
        BOOST_TEST(h.committed_bytes() == 2 * MiB);
        BOOST_TEST(static_cast<int>(h.base()[2 * MiB]) == 42);
    };
    auto expect_invalid = [&](auto op, const char* needle) {
        try {
            op();
            BOOST_ERROR("no exception for " << needle);
        } catch (const vmmpp::invalid_argument& e) {
            BOOST_TEST(std::string(e.what()).find(needle) != std::string::npos, e.what());
        }
        unchanged();
    };
    expect_invalid([&] { h.commit(1, 2 * MiB); }, "not aligned");
    expect_invalid([&] { h.commit(0, MiB); }, "not aligned");
    expect_invalid([&] { h.commit(0, 0); }, "zero bytes");
    expect_invalid([&] { h.commit(8 * MiB, 2 * MiB); }, "beyond the capacity");
    expect_invalid([&] { h.commit(6 * MiB, 4 * MiB); }, "beyond the capacity");
    // offset + bytes wraps around: still "beyond the capacity", never a wrapped small range.
    expect_invalid([&] { h.commit(2 * MiB, SIZE_MAX - 2 * MiB + 1); }, "beyond the capacity");
    expect_invalid([&] { h.commit(2 * MiB, 2 * MiB); }, "already committed");
    expect_invalid([&] { h.commit(0, 4 * MiB); }, "already committed");  // half committed
    expect_invalid([&] { h.decommit(0, 2 * MiB); }, "not committed");      // double free
    expect_invalid([&] { h.decommit(2 * MiB, 4 * MiB); }, "not committed");
    expect_invalid([&] { h.decommit(3 * MiB, 2 * MiB); }, "not aligned");
}

BOOST_AUTO_TEST_CASE(external_backing_accounts_and_never_frees) {
    std::vector<std::byte> buffer(8 * MiB, std::byte{7});
    {
        vmmpp::external<vmmpp::host_accessible> e(8 * MiB, {.pointer = buffer.data()});
        BOOST_TEST(e.base() == buffer.data());
        e.commit(0, 4 * MiB);
        BOOST_TEST(e.committed_bytes() == 4 * MiB);
        BOOST_CHECK_THROW(e.commit(2 * MiB, 2 * MiB), vmmpp::invalid_argument);
        e.decommit(0, 2 * MiB);
        BOOST_TEST(e.committed_bytes() == 2 * MiB);
        BOOST_CHECK_THROW(e.decommit(0, 2 * MiB), vmmpp::invalid_argument);
    }
    BOOST_TEST(static_cast<int>(buffer[0]) == 7);  // still ours, still intact
    BOOST_CHECK_THROW((vmmpp::external<vmmpp::host_accessible>(8 * MiB, {.pointer = nullptr})),
                      vmmpp::invalid_argument);
    static_assert(vmmpp::has_property<vmmpp::external<vmmpp::host_accessible>, vmmpp::host_accessible>);
    static_assert(!vmmpp::has_property<vmmpp::external<vmmpp::host_accessible>, vmmpp::device_accessible>);
}
