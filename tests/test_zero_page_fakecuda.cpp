// The vmm backing's zero page (vmm_options::unbacked) over the fake CUDA driver (CI runs these
// for real): uncommitted address space reads as zeros from construction on, a commit swaps the
// zero page for a real handle and a decommit swaps it back (the driver calls counted), a stray
// write faults (read-only) or lands in the shared page (writable), every failed driver call of a
// commit rolls back exactly, a zero page that cannot be mapped back is a counted hole repaired by
// the next call, a failed construction leaks nothing, and a kv_cache over it reads zeros from a
// freed block.
#define BOOST_TEST_MODULE vmm zero page on the fake driver
#include "support/cpu_main.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <csignal>
#include <cstring>
#include <ostream>
#include <string>
#include <vector>

#include "support/fakecuda.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;

namespace {

/// 2 MiB growth, so a freed page goes back at once (the growth policy is not what is tested).
using page_config = vmmpp::pool_config<vmmpp::vmm, vmmpp::page_granular, vmmpp::shared_budget>;

std::size_t granule() { return vmmpp::vmm_granularity(0); }

/// Whether every byte of [p, p+bytes) reads as zero (through the fake's host mapping).
bool all_zero(const std::byte* p, std::size_t bytes) {
    for (std::size_t i = 0; i < bytes; ++i) {
        if (p[i] != std::byte{0}) {
            return false;
        }
    }
    return true;
}

/// Driver calls of the four entry points a swap makes.
struct call_counts {
    std::size_t create = 0, release = 0, map = 0, unmap = 0, access = 0;
    static call_counts now() {
        return {fakecuda::calls("cuMemCreate"), fakecuda::calls("cuMemRelease"), fakecuda::calls("cuMemMap"),
                fakecuda::calls("cuMemUnmap"), fakecuda::calls("cuMemSetAccess")};
    }
    call_counts operator-(const call_counts& o) const {
        return {create - o.create, release - o.release, map - o.map, unmap - o.unmap, access - o.access};
    }
    bool operator==(const call_counts&) const = default;
};
call_counts expect(std::size_t create, std::size_t release, std::size_t map, std::size_t unmap, std::size_t access) {
    return {create, release, map, unmap, access};
}
std::ostream& operator<<(std::ostream& os, const call_counts& c) {
    return os << "{create " << c.create << ", release " << c.release << ", map " << c.map << ", unmap " << c.unmap
              << ", access " << c.access << "}";
}

/// What the backing and the driver hold: equal before and after a refused commit.
struct snapshot {
    std::size_t committed = 0, handles = 0, cached = 0, unzeroed = 0, driver_handles = 0, driver_mapped = 0;
    static snapshot of(const vmmpp::vmm& b) {
        return {b.committed_bytes(),      b.handle_count(),         b.cached_handle_count(),
                b.unzeroed_bytes(),       fakecuda::live_handles(), fakecuda::mapped_bytes()};
    }
    bool operator==(const snapshot&) const = default;
};
std::ostream& operator<<(std::ostream& os, const snapshot& s) {
    return os << "{committed " << s.committed << ", handles " << s.handles << ", cached " << s.cached
              << ", unzeroed " << s.unzeroed << " | driver " << s.driver_handles << " handles, " << s.driver_mapped
              << " mapped}";
}

/// Runs `f` in a child process; true when the child died of SIGSEGV (the fake's stand-in for a
/// GPU fault on a write to a read-only mapping).
template <class F>
bool faults_in_child(F f) {
    const pid_t pid = ::fork();
    if (pid == 0) {
        std::signal(SIGSEGV, SIG_DFL);  // Boost.Test's handler would report it and exit normally
        f();
        ::_exit(0);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV;
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(zero_page_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(the_default_maps_nothing_and_has_no_zero_page) {
    const std::size_t g = granule();
    const std::size_t mapped = fakecuda::mapped_bytes();
    vmmpp::vmm b(8 * g);
    BOOST_TEST((b.unbacked() == vmmpp::unbacked_access::fault));
    BOOST_TEST(b.zero_page_bytes() == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
}

BOOST_AUTO_TEST_CASE(construction_maps_one_zeroed_page_under_the_whole_span) {
    const std::size_t g = granule();
    const std::size_t handles = fakecuda::live_handles();
    const call_counts before = call_counts::now();
    vmmpp::vmm b(8 * g, {.unbacked = vmmpp::unbacked_access::zeros});
    BOOST_TEST(b.zero_page_bytes() == g);
    BOOST_TEST(b.committed_bytes() == 0u);  // the zero page is not committed memory
    BOOST_TEST(fakecuda::live_handles() == handles + 1);
    BOOST_TEST(fakecuda::mapped_bytes() == 8 * g);
    // One map per page, one access call to fill it (read-write, own device) and one for the span.
    BOOST_TEST(call_counts::now() - before == expect(1, 0, 8, 0, 2));
    BOOST_TEST(all_zero(b.base(), 8 * g));
}

BOOST_AUTO_TEST_CASE(commit_swaps_the_zero_page_for_memory_and_decommit_swaps_it_back) {
    const std::size_t g = granule();
    const std::size_t handles = fakecuda::live_handles();
    vmmpp::vmm b(8 * g, {.unbacked = vmmpp::unbacked_access::zeros});

    call_counts before = call_counts::now();
    b.commit(2 * g, g);
    BOOST_TEST(call_counts::now() - before == expect(1, 0, 1, 1, 1));  // unmap zero, create, map, access
    std::memset(b.base() + 2 * g, 0x5a, g);
    BOOST_TEST(fakecuda::mapped_bytes() == 8 * g);  // 7 zero pages and the handle
    BOOST_TEST(all_zero(b.base() + 3 * g, 5 * g));  // the write stayed in its own memory

    before = call_counts::now();
    b.decommit(2 * g, g);
    BOOST_TEST(call_counts::now() - before == expect(0, 1, 1, 1, 1));  // unmap, map zero, access, release
    BOOST_TEST(all_zero(b.base(), 8 * g));  // the freed page reads zeros, not its old bytes
    BOOST_TEST(fakecuda::live_handles() == handles + 1);
    BOOST_TEST(b.unzeroed_bytes() == 0u);
}

BOOST_AUTO_TEST_CASE(a_multi_page_handle_swaps_every_page_and_opens_them_in_one_call) {
    const std::size_t g = granule();
    vmmpp::vmm b(8 * g, {.unbacked = vmmpp::unbacked_access::zeros});
    call_counts before = call_counts::now();
    b.commit(4 * g, 3 * g);  // handle_bytes 0: one handle for the whole commit
    BOOST_TEST(call_counts::now() - before == expect(1, 0, 1, 3, 1));
    std::memset(b.base() + 4 * g, 0x33, 3 * g);
    before = call_counts::now();
    b.decommit(4 * g, 3 * g);
    BOOST_TEST(call_counts::now() - before == expect(0, 1, 3, 1, 1));
    BOOST_TEST(all_zero(b.base(), 8 * g));
}

BOOST_AUTO_TEST_CASE(a_stray_write_faults_on_the_read_only_zero_page) {
    const std::size_t g = granule();
    vmmpp::vmm b(4 * g, {.unbacked = vmmpp::unbacked_access::zeros});
    b.commit(0, g);
    BOOST_TEST(!faults_in_child([&] { b.base()[10] = std::byte{1}; }));  // committed memory is writable
    BOOST_TEST(faults_in_child([&] { b.base()[2 * g + 10] = std::byte{1}; }));
    BOOST_TEST(all_zero(b.base() + g, 3 * g));
}

BOOST_AUTO_TEST_CASE(a_stray_write_to_the_writable_zero_page_shows_under_every_unbacked_page) {
    const std::size_t g = granule();
    vmmpp::vmm b(4 * g, {.unbacked = vmmpp::unbacked_access::zeros_writable});
    BOOST_TEST(all_zero(b.base(), 4 * g));
    b.base()[g + 10] = std::byte{7};  // no fault
    BOOST_TEST((b.base()[3 * g + 10] == std::byte{7}));  // one shared page: documented
    b.commit(3 * g, g);
    b.decommit(3 * g, g);
    BOOST_TEST((b.base()[3 * g + 10] == std::byte{7}));
}

BOOST_AUTO_TEST_CASE(every_failed_driver_call_of_a_commit_rolls_back_exactly) {
    const std::size_t g = granule();
    for (const char* function : {"cuMemCreate", "cuMemUnmap", "cuMemMap", "cuMemSetAccess"}) {
        for (int nth = 1; nth <= 3; ++nth) {
            BOOST_TEST_CONTEXT(function << " #" << nth << " of a 3-handle commit") {
                vmmpp::vmm b(16 * g, {.handle_bytes = g, .max_cached_handles = 1,
                                      .unbacked = vmmpp::unbacked_access::zeros});
                b.commit(0, g);
                b.commit(12 * g, g);
                b.decommit(12 * g, g);  // one kept handle: the commit reuses it first
                const snapshot before = snapshot::of(b);
                const std::size_t calls_before = fakecuda::calls(function);
                fakecuda::fail(function, nth, CUDA_ERROR_OUT_OF_MEMORY);
                bool threw = false;
                try {
                    b.commit(4 * g, 3 * g);
                } catch (const vmmpp::out_of_memory&) {
                    threw = true;
                } catch (const vmmpp::cuda_error& e) {
                    threw = true;
                    BOOST_TEST(e.call() == function);
                }
                if (fakecuda::calls(function) - calls_before < static_cast<std::size_t>(nth)) {
                    BOOST_TEST(!threw);  // that call never came (a kept handle needs no cuMemCreate)
                    fakecuda::reset();
                    continue;
                }
                BOOST_TEST(threw);
                BOOST_TEST(snapshot::of(b) == before);
                BOOST_TEST(all_zero(b.base() + g, 15 * g));
                b.commit(4 * g, 3 * g);  // usable afterwards
                BOOST_TEST(b.committed_bytes() == 4 * g);
                BOOST_TEST(fakecuda::mapped_bytes() == 16 * g);
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(a_zero_page_that_cannot_be_mapped_back_is_a_counted_hole_repaired_later) {
    const std::size_t g = granule();
    vmmpp::vmm b(8 * g, {.unbacked = vmmpp::unbacked_access::zeros});
    b.commit(2 * g, g);
    // Decommit: the handle goes, the zero page's map fails. The decommit itself succeeded.
    fakecuda::fail("cuMemMap", 1, CUDA_ERROR_OUT_OF_MEMORY);
    b.decommit(2 * g, g);
    BOOST_TEST(b.committed_bytes() == 0u);
    BOOST_TEST(b.unzeroed_bytes() == g);
    BOOST_TEST(fakecuda::mapped_bytes() == 7 * g);
    // The next call maps it again first.
    b.commit(5 * g, g);
    BOOST_TEST(b.unzeroed_bytes() == 0u);
    BOOST_TEST(fakecuda::mapped_bytes() == 8 * g);
    BOOST_TEST(all_zero(b.base() + 2 * g, g));

    // A commit whose rollback cannot put the zero page back: the commit is refused (cuMemMap of
    // the handle), the zero page's map fails too; the hole is counted, then committing over it works.
    fakecuda::fail("cuMemMap", 1, CUDA_ERROR_OUT_OF_MEMORY);
    fakecuda::fail("cuMemMap", 2, CUDA_ERROR_OUT_OF_MEMORY);
    BOOST_CHECK_THROW(b.commit(0, g), vmmpp::cuda_error);
    BOOST_TEST(b.committed_bytes() == g);
    BOOST_TEST(b.unzeroed_bytes() == g);
    b.commit(0, g);  // the repair maps the zero page, the commit swaps it out again
    BOOST_TEST(b.unzeroed_bytes() == 0u);
    BOOST_TEST(b.committed_bytes() == 2 * g);
    BOOST_TEST(fakecuda::mapped_bytes() == 8 * g);
}

BOOST_AUTO_TEST_CASE(a_failed_construction_leaves_nothing_behind) {
    const std::size_t g = granule();
    for (const char* function : {"cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemcpyHtoDAsync"}) {
        for (int nth : {1, 2, 3}) {
            BOOST_TEST_CONTEXT(function << " #" << nth) {
                const std::size_t handles = fakecuda::live_handles();
                const std::size_t mapped = fakecuda::mapped_bytes();
                const std::size_t calls_before = fakecuda::calls(function);
                fakecuda::fail(function, nth, CUDA_ERROR_OUT_OF_MEMORY);
                bool threw = false;
                try {
                    vmmpp::vmm b(4 * g, {.unbacked = vmmpp::unbacked_access::zeros});
                } catch (const vmmpp::cuda_error& e) {
                    threw = true;
                    BOOST_TEST(e.call() == function);
                }
                BOOST_TEST(threw == (fakecuda::calls(function) - calls_before >= static_cast<std::size_t>(nth)));
                fakecuda::reset();
                BOOST_TEST(fakecuda::live_handles() == handles);
                BOOST_TEST(fakecuda::mapped_bytes() == mapped);
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(a_kv_cache_reads_zeros_from_a_freed_block_and_a_never_committed_one) {
    // Two blocks per page of K (and of V): freeing the sequence's two blocks empties the page.
    const std::size_t g = granule();
    const vmmpp::kv_geometry geometry{.layers = 1, .kv_heads = 1, .head_dim = 8, .type = vmmpp::dtype::f32,
                                      .block_tokens = static_cast<std::uint32_t>(g / 64), .max_blocks = 8};
    vmmpp::budget budget(64 * g);
    vmmpp::kv_cache<page_config, vmmpp::layer_major> cache(geometry, {.unbacked = vmmpp::unbacked_access::zeros}, {},
                                                 budget.register_model("m", 64 * g),
                                                 {.span_alignment = g});
    const auto seq = cache.add_sequence();
    cache.append(seq, 2 * geometry.block_tokens);
    const auto blocks = cache.block_table(seq);
    BOOST_TEST_REQUIRE(blocks.size() == 2u);
    const vmmpp::kv_tensor k = cache.tensor(0, vmmpp::kv_part::key);
    auto* block1 = static_cast<std::byte*>(k.data) + static_cast<std::size_t>(blocks[1]) * k.strides[0] * 4;
    std::memset(block1, 0x7f, geometry.block_tokens * 8 * 4);
    cache.free(seq);
    cache.collect();
    BOOST_TEST(cache.pool().committed_bytes() == 0u);
    BOOST_TEST(all_zero(block1, geometry.block_tokens * 8 * 4));  // the freed block
    auto* last = static_cast<std::byte*>(k.data) + 7 * k.strides[0] * 4;
    BOOST_TEST(all_zero(last, geometry.block_tokens * 8 * 4));  // never committed
}

BOOST_AUTO_TEST_SUITE_END()
