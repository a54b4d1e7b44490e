// The vmm backing over the fake CUDA driver (support/fakecuda; CI runs these for real): a commit
// round trip through the mapping; every driver call of a commit failing at every handle rolls
// back exactly, the handle cache included (review F3); kept handles are reused and counted; the
// adaptors forward the backing's capabilities, so a pool over zeroing<vmm> charges and trims the
// kept handles (F4); a failed cuMemUnmap or cuMemRelease in decommit is reported and contained.
#define BOOST_TEST_MODULE vmm on the fake driver
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <unistd.h>

#include <cstring>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "support/fakecuda.hpp"
#include "vmmpp/backing/fault_injecting.hpp"
#include "vmmpp/backing/zeroing.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;

namespace {


/// The fake's allocation granularity (FAKECUDA_GRANULARITY, 64 KiB by default): one handle.
std::size_t granule() { return vmmpp::vmm_granularity(0); }

bool contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

/// What a vmm backing and the driver hold: equal before and after a refused commit.
struct snapshot {
    std::size_t committed = 0, handles = 0, cached_bytes = 0, cached_handles = 0, reused = 0, leaked = 0;
    std::size_t driver_handles = 0, driver_handle_bytes = 0, driver_mapped = 0;

    static snapshot of(const vmmpp::vmm& b) {
        return {b.committed_bytes(),     b.handle_count(),          b.cached_bytes(),
                b.cached_handle_count(), b.reused_handles(),        b.leaked_bytes(),
                fakecuda::live_handles(), fakecuda::live_handle_bytes(), fakecuda::mapped_bytes()};
    }
    bool operator==(const snapshot&) const = default;
};
std::ostream& operator<<(std::ostream& os, const snapshot& s) {
    return os << "{committed " << s.committed << ", handles " << s.handles << ", cached " << s.cached_bytes << " in "
              << s.cached_handles << ", reused " << s.reused << ", leaked " << s.leaked << " | driver: "
              << s.driver_handles << " handles, " << s.driver_handle_bytes << " bytes, " << s.driver_mapped
              << " mapped}";
}

// Kept handles a commit finds when it starts: none, or two of its three pieces.
struct cold_cache {
    static constexpr std::size_t kept = 0;
};
struct warm_cache {
    static constexpr std::size_t kept = 2;
};
using cache_states = boost::mpl::list<cold_cache, warm_cache>;

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(vmm_on_the_fake_driver, fakecuda::clean_driver)

// --- F4: capabilities, by name, through the adaptors -----------------------------------------

static_assert(vmmpp::handle_keeping_backing<vmmpp::vmm> && vmmpp::context_binding_backing<vmmpp::vmm> &&
              vmmpp::handle_exporting_backing<vmmpp::vmm>);
static_assert(vmmpp::handle_keeping_backing<vmmpp::zeroing<vmmpp::vmm>> &&
              vmmpp::context_binding_backing<vmmpp::zeroing<vmmpp::vmm>> &&
              vmmpp::handle_exporting_backing<vmmpp::zeroing<vmmpp::vmm>>);
static_assert(vmmpp::handle_keeping_backing<vmmpp::fault_injecting<vmmpp::vmm>> &&
              vmmpp::context_binding_backing<vmmpp::fault_injecting<vmmpp::vmm>> &&
              vmmpp::handle_exporting_backing<vmmpp::fault_injecting<vmmpp::vmm>>);
static_assert(vmmpp::handle_keeping_backing<vmmpp::fault_injecting<vmmpp::zeroing<vmmpp::vmm>>>);
static_assert(!vmmpp::handle_keeping_backing<vmmpp::host> && !vmmpp::context_binding_backing<vmmpp::host> &&
              !vmmpp::handle_exporting_backing<vmmpp::host>);
static_assert(!vmmpp::handle_keeping_backing<vmmpp::zeroing<vmmpp::host>> &&
              !vmmpp::context_binding_backing<vmmpp::fault_injecting<vmmpp::host>>);

// --- the backing itself --------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(commit_maps_memory_that_keeps_its_bytes_and_decommit_gives_it_back) {
    const std::size_t g = granule();
    const snapshot empty = snapshot::of(vmmpp::vmm(g));
    vmmpp::vmm b(16 * g, {.handle_bytes = g});
    b.commit(2 * g, 3 * g);
    BOOST_TEST(b.committed_bytes() == 3 * g);
    BOOST_TEST(b.handle_count() == 3u);
    BOOST_TEST(fakecuda::live_handles() == empty.driver_handles + 3);
    BOOST_TEST(fakecuda::mapped_bytes() == 3 * g);

    std::byte* p = b.base() + 2 * g;
    for (std::size_t i = 0; i < 3 * g; ++i) {
        p[i] = static_cast<std::byte>(i * 7);
    }
    b.commit(8 * g, g);
    std::memset(b.base() + 8 * g, 0x11, g);
    bool intact = true;
    for (std::size_t i = 0; i < 3 * g; ++i) {
        intact = intact && p[i] == static_cast<std::byte>(i * 7);
    }
    BOOST_TEST(intact);

    // The handles go to another mapping (shared pages) as file descriptors of the same memory.
    const auto exported = b.export_handles();
    BOOST_TEST_REQUIRE(exported.size() == 4u);
    BOOST_TEST(exported[0].offset == 2 * g);
    BOOST_TEST(exported[3].offset == 8 * g);
    for (const auto& h : exported) {
        BOOST_TEST(h.bytes == g);
        BOOST_TEST(h.fd.valid());  // owned: closed with `exported`
    }

    b.decommit(2 * g, 3 * g);
    b.decommit(8 * g, g);
    BOOST_TEST(b.committed_bytes() == 0u);
    BOOST_TEST(snapshot::of(b) == empty);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(every_failed_driver_call_of_a_commit_rolls_back_exactly, Cache, cache_states) {
    const std::size_t g = granule();
    for (const char* function : {"cuMemCreate", "cuMemMap", "cuMemSetAccess"}) {
        for (int nth = 1; nth <= 3; ++nth) {
            BOOST_TEST_CONTEXT(function << " #" << nth << " of a 3-handle commit, " << Cache::kept << " kept handles") {
                vmmpp::vmm b(16 * g, {.handle_bytes = g, .max_cached_handles = 4});
                b.commit(0, g);  // something committed beside it
                if (Cache::kept > 0) {
                    b.commit(12 * g, Cache::kept * g);
                    b.decommit(12 * g, Cache::kept * g);
                }
                BOOST_TEST_REQUIRE(b.cached_handle_count() == Cache::kept);
                const snapshot before = snapshot::of(b);
                const std::size_t calls_before = fakecuda::calls(function);
                const bool creating = std::string(function) == "cuMemCreate";
                fakecuda::fail(function, nth, creating ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_ERROR_INVALID_VALUE);
                bool threw = false;
                try {
                    b.commit(4 * g, 3 * g);
                } catch (const vmmpp::out_of_memory& e) {
                    threw = true;
                    BOOST_TEST(creating);
                    BOOST_TEST(e.requested() == 3 * g);
                } catch (const vmmpp::cuda_error& e) {
                    threw = true;
                    BOOST_TEST(e.call() == function);
                    BOOST_TEST(e.code() == static_cast<int>(CUDA_ERROR_INVALID_VALUE));
                }
                if (fakecuda::calls(function) - calls_before < static_cast<std::size_t>(nth)) {
                    // The commit never made that call (it reused kept handles instead): it succeeded.
                    BOOST_TEST(!threw);
                    BOOST_TEST(b.committed_bytes() == before.committed + 3 * g);
                    fakecuda::reset();
                    continue;
                }
                BOOST_TEST(threw);
                BOOST_TEST(snapshot::of(b) == before);
                // Usable afterwards, and the kept handles are still there to serve the retry.
                b.commit(4 * g, 3 * g);
                BOOST_TEST(b.committed_bytes() == before.committed + 3 * g);
                BOOST_TEST(b.reused_handles() == before.reused + Cache::kept);
                BOOST_TEST(b.cached_handle_count() == 0u);
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(kept_handles_are_reused_and_counted) {
    const std::size_t g = granule();
    const std::size_t driver_handles = fakecuda::live_handles();
    vmmpp::vmm b(16 * g, {.max_cached_handles = 2});
    b.commit(0, g);
    b.commit(g, g);
    b.commit(2 * g, g);
    b.decommit(0, g);
    b.decommit(g, g);
    b.decommit(2 * g, g);  // no room: released
    BOOST_TEST(b.cached_handle_count() == 2u);
    BOOST_TEST(b.cached_bytes() == 2 * g);
    BOOST_TEST(b.committed_bytes() == 0u);
    BOOST_TEST(fakecuda::live_handles() == driver_handles + 2);  // kept handles still hold memory
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);

    const std::size_t creates = fakecuda::calls("cuMemCreate");
    const std::size_t releases = fakecuda::calls("cuMemRelease");
    b.commit(5 * g, g);  // served by a kept handle: no cuMemCreate
    BOOST_TEST(fakecuda::calls("cuMemCreate") == creates);
    BOOST_TEST(b.reused_handles() == 1u);
    BOOST_TEST(b.cached_bytes() == g);
    b.commit(6 * g, 2 * g);  // no kept handle of 2 granules: a new one
    BOOST_TEST(fakecuda::calls("cuMemCreate") == creates + 1);
    BOOST_TEST(b.reused_handles() == 1u);
    b.decommit(5 * g, g);  // kept again, without cuMemRelease
    BOOST_TEST(fakecuda::calls("cuMemRelease") == releases);
    BOOST_TEST(b.cached_handle_count() == 2u);

    BOOST_TEST(b.release_cached() == 2 * g);
    BOOST_TEST(b.cached_bytes() == 0u);
    BOOST_TEST(b.leaked_bytes() == 0u);
    BOOST_TEST(fakecuda::live_handles() == driver_handles + 1);  // only the mapped 2-granule handle
}

// --- F3: a failed map of a kept handle puts it back --------------------------------------------

BOOST_AUTO_TEST_CASE(a_failed_map_of_a_kept_handle_puts_it_back_in_the_cache) {
    const std::size_t g = granule();
    for (const char* function : {"cuMemMap", "cuMemSetAccess"}) {
        BOOST_TEST_CONTEXT(function << " fails for the kept handle") {
            vmmpp::vmm b(8 * g, {.max_cached_handles = 1});
            b.commit(0, g);
            b.decommit(0, g);
            const snapshot before = snapshot::of(b);
            BOOST_TEST_REQUIRE(before.cached_handles == 1u);
            fakecuda::fail(function, 1, CUDA_ERROR_OUT_OF_MEMORY);
            BOOST_CHECK_THROW(b.commit(2 * g, g), vmmpp::cuda_error);
            BOOST_TEST(b.cached_handle_count() == 1u);
            BOOST_TEST(b.cached_bytes() == g);
            BOOST_TEST(fakecuda::live_handles() == before.driver_handles);
            BOOST_TEST(snapshot::of(b) == before);
            // What a pool charges for kept handles is still what release_cached gives back.
            BOOST_TEST(b.release_cached() == g);
            BOOST_TEST(fakecuda::live_handles() == before.driver_handles - 1);
        }
    }
}

// --- zeroing and pools over the adaptors (F4) --------------------------------------------------

BOOST_AUTO_TEST_CASE(zeroing_zeroes_a_commit_that_reuses_a_kept_handle) {
    const std::size_t g = granule();
    auto nonzero = [](const std::byte* p, std::size_t n) {
        std::size_t count = 0;
        for (std::size_t i = 0; i < n; ++i) {
            count += p[i] != std::byte{0} ? 1 : 0;
        }
        return count;
    };
    {
        // Without zeroing, a kept handle comes back with the bytes it had: the case zeroing is for.
        vmmpp::vmm plain(8 * g, {.max_cached_handles = 1});
        plain.commit(0, g);
        std::memset(plain.base(), 0xab, g);
        plain.decommit(0, g);
        plain.commit(3 * g, g);
        BOOST_TEST(plain.reused_handles() == 1u);
        BOOST_TEST(nonzero(plain.base() + 3 * g, g) == g);
    }
    vmmpp::zeroing<vmmpp::vmm> b(8 * g, {.max_cached_handles = 1});
    b.commit(0, g);
    std::memset(b.base(), 0xab, g);
    b.decommit(0, g);
    BOOST_TEST(b.cached_bytes() == g);  // forwarded from the vmm
    b.commit(3 * g, g);
    BOOST_TEST(b.upstream().reused_handles() == 1u);
    BOOST_TEST(nonzero(b.base() + 3 * g, g) == 0u);
}

BOOST_AUTO_TEST_CASE(adaptors_forward_binding_and_export) {
    const std::size_t g = granule();
    vmmpp::fault_injecting<vmmpp::zeroing<vmmpp::vmm>> b(8 * g, {.upstream = {.max_cached_handles = 1}});
    const std::size_t binds = fakecuda::calls("cuCtxSetCurrent");
    b.bind_current_thread();
    BOOST_TEST(fakecuda::calls("cuCtxSetCurrent") == binds + 1);
    b.commit(g, 2 * g);
    const auto exported = b.export_handles();
    BOOST_TEST_REQUIRE(exported.size() == 1u);
    BOOST_TEST(exported[0].offset == g);
    BOOST_TEST(exported[0].bytes == 2 * g);
    BOOST_TEST(exported[0].fd.valid());
    b.decommit(g, 2 * g);
    BOOST_TEST(b.cached_bytes() == 2 * g);
    BOOST_TEST(b.release_cached() == 2 * g);
}

BOOST_AUTO_TEST_CASE(a_pool_over_zeroing_vmm_charges_kept_handles_and_trim_returns_them) {
    using config = vmmpp::pool_config<vmmpp::zeroing<vmmpp::vmm>, vmmpp::page_granular, vmmpp::shared_budget>;
    const std::size_t g = granule();
    const std::size_t driver_handles = fakecuda::live_handles();
    vmmpp::budget budget(16 * g);
    vmmpp::elastic_pool<config> pool(16 * g, {.max_cached_handles = 4}, {}, budget.register_model("m", 16 * g));
    BOOST_TEST_REQUIRE(pool.page_bytes() == g);
    pool.ensure_committed(0, 4 * g);
    pool.release(0, 4 * g);
    const auto s = pool.stats();
    BOOST_TEST(s.committed == 0u);
    BOOST_TEST(s.cached_bytes == 4 * g);
    BOOST_TEST(s.charged == 4 * g);
    BOOST_TEST(budget.stats().committed == 4 * g);  // kept handles still occupy the device
    BOOST_TEST(fakecuda::live_handles() == driver_handles + 4);

    BOOST_TEST(pool.trim() == 4 * g);
    BOOST_TEST(pool.stats().cached_bytes == 0u);
    BOOST_TEST(pool.stats().charged == 0u);
    BOOST_TEST(budget.stats().committed == 0u);
    BOOST_TEST(fakecuda::live_handles() == driver_handles);
}

BOOST_AUTO_TEST_CASE(a_mapper_pool_over_zeroing_vmm_with_threads_gives_everything_back) {
    // The driver is called from the mapper thread and the callers' at once (TSan runs this).
    using config = vmmpp::pool_config<vmmpp::zeroing<vmmpp::vmm>, vmmpp::mapped_ahead<vmmpp::page_granular>,
                                      vmmpp::shared_budget>;
    const std::size_t g = granule();
    const std::size_t driver_handles = fakecuda::live_handles();
    {
        vmmpp::budget budget(64 * g);
        vmmpp::elastic_pool<config> pool(64 * g, {.max_cached_handles = 2},
                                         {.low_watermark = 2, .high_watermark = 4,
                                          .release_delay = std::chrono::milliseconds(1)},
                                         budget.register_model("m", 48 * g));
        std::vector<std::thread> threads;
        for (std::size_t t = 0; t < 4; ++t) {
            threads.emplace_back([&pool, g, t] {
                for (int i = 0; i < 200; ++i) {
                    const std::size_t offset = (t * 16 + static_cast<std::size_t>(i) % 8) * g;
                    pool.ensure_committed(offset, 2 * g);
                    std::memset(pool.base() + offset, static_cast<int>(t), 2 * g);
                    pool.release(offset, 2 * g);
                }
            });
        }
        for (auto& th : threads) {
            th.join();
        }
        BOOST_TEST(budget.stats().committed <= 48 * g);
    }
    BOOST_TEST(fakecuda::live_handles() == driver_handles);
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);
}

// --- failure containment in decommit -------------------------------------------------------------

BOOST_AUTO_TEST_CASE(a_failed_unmap_keeps_the_handle_mapped_and_out_of_service) {
    const std::size_t g = granule();
    vmmpp::vmm b(16 * g, {.handle_bytes = g, .max_cached_handles = 4});
    b.commit(0, 3 * g);
    const std::size_t driver_handles = fakecuda::live_handles();
    fakecuda::fail("cuMemUnmap", 2, CUDA_ERROR_UNKNOWN);  // the second handle's
    try {
        b.decommit(0, 3 * g);
        BOOST_FAIL("decommit must report the failed cuMemUnmap");
    } catch (const vmmpp::cuda_error& e) {
        BOOST_TEST(e.call() == "cuMemUnmap");
        BOOST_TEST(e.code() == static_cast<int>(CUDA_ERROR_UNKNOWN));
        BOOST_TEST(contains(e.what(), "offset " + std::to_string(g)), e.what());
    }
    // The first handle was decommitted (and kept); the second and third are as they were.
    BOOST_TEST(b.committed_bytes() == 2 * g);
    BOOST_TEST(b.handle_count() == 2u);
    BOOST_TEST(b.cached_handle_count() == 1u);
    BOOST_TEST(fakecuda::mapped_bytes() == 2 * g);
    BOOST_TEST(fakecuda::live_handles() == driver_handles);
    BOOST_CHECK_THROW(b.commit(g, g), vmmpp::invalid_argument);  // still committed

    // Commits elsewhere get the one handle that was unmapped, then new ones: never the failed one.
    b.commit(8 * g, g);
    BOOST_TEST(b.reused_handles() == 1u);
    const std::size_t creates = fakecuda::calls("cuMemCreate");
    b.commit(9 * g, g);
    BOOST_TEST(b.reused_handles() == 1u);
    BOOST_TEST(fakecuda::calls("cuMemCreate") == creates + 1);
}

BOOST_AUTO_TEST_CASE(a_handle_whose_unmap_failed_is_never_kept) {
    const std::size_t g = granule();
    vmmpp::vmm b(8 * g, {.max_cached_handles = 2});
    b.commit(0, g);
    fakecuda::fail("cuMemUnmap", 1, CUDA_ERROR_UNKNOWN);
    BOOST_CHECK_THROW(b.decommit(0, g), vmmpp::cuda_error);
    BOOST_TEST(b.cached_handle_count() == 0u);
    BOOST_TEST(b.committed_bytes() == g);
    BOOST_TEST(fakecuda::mapped_bytes() == g);
    const std::size_t creates = fakecuda::calls("cuMemCreate");
    b.commit(4 * g, g);  // a new handle, not the one still mapped at 0
    BOOST_TEST(fakecuda::calls("cuMemCreate") == creates + 1);
    BOOST_TEST(b.reused_handles() == 0u);
    b.decommit(0, g);  // the driver answers again: the range can still be given back
    BOOST_TEST(b.committed_bytes() == g);
}

BOOST_AUTO_TEST_CASE(a_failed_release_is_counted_as_leaked) {
    const std::size_t g = granule();
    vmmpp::vmm b(16 * g, {.handle_bytes = g});
    b.commit(0, 3 * g);
    const std::size_t driver_handles = fakecuda::live_handles();
    fakecuda::fail("cuMemRelease", 2, CUDA_ERROR_UNKNOWN);  // the second handle's
    try {
        b.decommit(0, 3 * g);
        BOOST_FAIL("decommit must report the failed cuMemRelease");
    } catch (const vmmpp::cuda_error& e) {
        BOOST_TEST(e.call() == "cuMemRelease");
        BOOST_TEST(contains(e.what(), "offset " + std::to_string(g)), e.what());
    }
    // Everything was unmapped and decommitted; the handle the driver kept is dropped and counted.
    BOOST_TEST(b.committed_bytes() == 0u);
    BOOST_TEST(b.handle_count() == 0u);
    BOOST_TEST(b.leaked_bytes() == g);
    BOOST_TEST(fakecuda::mapped_bytes() == 0u);
    BOOST_TEST(fakecuda::live_handles() == driver_handles - 2);
    b.commit(0, 3 * g);  // the range serves again with new handles
    BOOST_TEST(b.committed_bytes() == 3 * g);

    // A kept handle the driver will not release is dropped and counted too, not reported freed.
    vmmpp::vmm kept(8 * g, {.max_cached_handles = 1});
    kept.commit(0, g);
    kept.decommit(0, g);
    fakecuda::fail("cuMemRelease", 1, CUDA_ERROR_UNKNOWN);
    BOOST_TEST(kept.release_cached() == 0u);
    BOOST_TEST(kept.cached_bytes() == 0u);
    BOOST_TEST(kept.leaked_bytes() == g);
}

BOOST_AUTO_TEST_SUITE_END()

// vmm_options::gpu_direct_rdma: every handle, fresh or kept and reused, is created GPUDirect RDMA
// capable (what an RDMA NIC needs to register it); without the option none is; a device without
// GPUDirect RDMA on VMM memory refuses the option, naming the device.
BOOST_AUTO_TEST_CASE(gpu_direct_rdma_handles_only_when_asked) {
    const std::size_t g = granule();
    const std::size_t before = fakecuda::gpu_direct_rdma_handles();
    {
        vmmpp::vmm rdma(8 * g, {.handle_bytes = g, .max_cached_handles = 2, .gpu_direct_rdma = true});
        rdma.commit(0, 3 * g);
        BOOST_TEST(fakecuda::gpu_direct_rdma_handles() == before + 3);
        rdma.decommit(0, g);  // kept, then reused by the next commit
        rdma.commit(4 * g, g);
        BOOST_TEST(rdma.reused_handles() == 1u);
        BOOST_TEST(fakecuda::gpu_direct_rdma_handles() == before + 3);

        vmmpp::vmm plain(8 * g, {.handle_bytes = g});
        plain.commit(0, 2 * g);
        BOOST_TEST(fakecuda::gpu_direct_rdma_handles() == before + 3);
    }
    BOOST_TEST(fakecuda::gpu_direct_rdma_handles() == before);

    ::setenv("FAKECUDA_GDR_WITH_VMM", "0", 1);
    try {
        vmmpp::vmm refused(8 * g, {.gpu_direct_rdma = true});
        BOOST_FAIL("expected invalid_argument");
    } catch (const vmmpp::invalid_argument& e) {
        BOOST_TEST(std::string(e.what()).find("CUDA device 0") != std::string::npos, e.what());
    }
    ::unsetenv("FAKECUDA_GDR_WITH_VMM");
}

// --- an append the quota refuses -----------------------------------------------------------------

// The quota is asked once for a whole append, before any page is committed: a refused append
// makes no driver call that allocates or maps, and its message tells the append, not its last page.
// (Before, it committed pages up to the limit, one cuMemCreate each, and decommitted them again.)
template <class Config>
struct refused_append_case {
    using config = Config;
};
using refused_append_cases =
    boost::mpl::list<refused_append_case<vmmpp::elastic_page_config>, refused_append_case<vmmpp::elastic_config>>;

BOOST_AUTO_TEST_CASE_TEMPLATE(a_refused_append_commits_nothing_and_says_what_the_append_needed, Case,
                              refused_append_cases) {
    const std::size_t g = granule();
    // block_major, 8 layers x K/V x 16 tokens x 2 heads x 64 x 2 bytes = 64 KiB: one block per page.
    constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                      .block_tokens = 16, .max_blocks = 256};
    BOOST_TEST_REQUIRE(geom.block_bytes() == g);
    vmmpp::budget budget(64 * g);
    vmmpp::kv_cache<typename Case::config, vmmpp::block_major> cache(geom, {}, {}, budget.register_model("kv", 32 * g));
    const auto first = cache.add_sequence();
    (void)cache.append(first, 16 * 26);  // 26 blocks
    const std::size_t in_use = budget.stats().committed;
    BOOST_TEST_REQUIRE(in_use >= 26 * g);
    BOOST_TEST_REQUIRE(in_use < 32 * g);
    const std::size_t creates = fakecuda::calls("cuMemCreate");
    const std::size_t maps = fakecuda::calls("cuMemMap");
    const std::size_t unmaps = fakecuda::calls("cuMemUnmap");
    const std::size_t mapped = fakecuda::mapped_bytes();

    const auto second = cache.add_sequence();
    try {
        (void)cache.append(second, 16 * 12);  // 12 more blocks: over the model's 32 pages
        BOOST_FAIL("the append was not refused");
    } catch (const vmmpp::over_quota& e) {
        BOOST_TEST_MESSAGE(e.what());
        BOOST_TEST(e.which() == "model kv");
        BOOST_TEST(e.in_use() == in_use);
        BOOST_TEST(e.limit() == 32 * g);
        BOOST_TEST(e.requested() + e.in_use() > e.limit());
        BOOST_TEST(e.requested() == 12 * g);  // every page of the 12 blocks: none committed yet
        BOOST_TEST(std::string(e.what()) ==
                   "over quota (model kv): append of 192 tokens to sequence " + std::to_string(second) + " needs " +
                       vmmpp::detail::size_text(e.requested()) + " more; " + vmmpp::detail::size_text(in_use) +
                       " in use, limit " + vmmpp::detail::size_text(32 * g));
    }
    BOOST_TEST(fakecuda::calls("cuMemCreate") == creates);
    BOOST_TEST(fakecuda::calls("cuMemMap") == maps);
    BOOST_TEST(fakecuda::calls("cuMemUnmap") == unmaps);
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(budget.stats().committed == in_use);
    BOOST_TEST(cache.pool().stats().charged == in_use);  // nothing left prepaid
    BOOST_TEST(cache.used_blocks() == 26u);

    // What fits still appends, drawing on one charge, and gives back what it did not use.
    (void)cache.append(second, 16 * 2);
    BOOST_TEST(budget.stats().committed == cache.pool().stats().charged);
    BOOST_TEST(budget.stats().committed <= 32 * g);
}
