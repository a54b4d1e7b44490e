// copy_blocks in the caches' stream order, on the fake driver (support/fakecuda): with the fake's
// GPU held, a copy queued on s1 must keep its source and destination memory mapped while another
// stream frees either sequence, and must not write a reused destination block before the reads
// queued on another stream before that block's free. Each case fails without copy_blocks' fences
// (a copy meeting unmapped memory makes the fake's CUDA_ERROR_ILLEGAL_ADDRESS sticky, as a real
// GPU loses its context). The fake has one device: copy_blocks between two GPUs (a cache's own
// stream standing in for the caller's) is not run here.
#define BOOST_TEST_MODULE copy_blocks stream order on the fake driver
#include "support/cpu_main.hpp"

#include <boost/mpl/list.hpp>

#include <chrono>
#include <cstring>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "support/fake_kv_cases.hpp"
#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
#include "vmmpp/kv/transfer.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::queued_reads;
using namespace std::chrono_literals;

namespace {

// As test_stream_order_fakecuda: a K or V piece is 4 KiB, a block_major block one 64 KiB page.
template <class Config, class Layout>
using kv_case = vmmpp_test::fake_kv_case<Config, Layout>;
using kv_cases = vmmpp_test::fake_kv_cases;
constexpr vmmpp::kv_geometry geom = vmmpp_test::fake_kv_geometry;
constexpr std::size_t piece = vmmpp_test::fake_kv_piece;
constexpr std::size_t budget_bytes = std::size_t{128} << 20;

/// A source and a destination cache on one budget.
template <class Case>
struct two_caches {
    vmmpp::budget budget{budget_bytes};
    typename Case::cache src{geom, {}, {}, budget.register_model("src", budget_bytes / 2)};
    typename Case::cache dst{geom, {}, {}, budget.register_model("dst", budget_bytes / 2)};
};

template <class Cache>
void fill_block(Cache& c, std::int32_t block, unsigned char value) {
    vmmpp_test::fill_block_pieces(c, block, value, piece);
}
template <class Cache>
std::size_t differing(const Cache& c, std::int32_t block, unsigned char value) {
    return vmmpp_test::differing_bytes(c, block, value, piece);
}

/// A new sequence of `blocks` blocks in `c`, filled with `value`; returns its id and blocks.
template <class Cache>
std::pair<vmmpp::seq_id, std::vector<std::int32_t>> filled_sequence(Cache& c, std::size_t blocks, unsigned char value) {
    const auto s = c.add_sequence();
    c.append(s, geom.block_tokens * blocks);
    std::vector<std::int32_t> ids(c.block_table(s).begin(), c.block_table(s).end());
    for (auto b : ids) {
        fill_block(c, b, value);
    }
    return {s, ids};
}

/// Queues on `stream` a write of `value` into every K and V piece of `block` (copies from host
/// buffers that live until the end of the test program).
template <class Cache>
void write_block(const Cache& c, std::int32_t block, unsigned char value, CUstream stream) {
    static std::vector<std::unique_ptr<std::vector<unsigned char>>> sources;
    sources.push_back(std::make_unique<std::vector<unsigned char>>(piece, value));
    vmmpp::primary_context context{0};
    vmmpp::scoped_context current(context);
    for (std::uint32_t l = 0; l < geom.layers; ++l) {
        for (const std::byte* p : {c.key(l, block), c.value(l, block)}) {
            vmmpp::driver::check(vmmpp::driver::get().memcpy_async(reinterpret_cast<CUdeviceptr>(p),
                                                                    reinterpret_cast<CUdeviceptr>(sources.back()->data()),
                                                                    piece, stream),
                                 "cuMemcpyAsync(test write)");
        }
    }
}

/// Whether no queued copy met unmapped memory. If one did, resets the fake (its sticky error),
/// so that the rest of the case, and the end of its streams and caches, run on a clean driver.
bool no_fault() {
    const bool ok = fakecuda::sticky_error() == CUDA_SUCCESS;
    if (!ok) {
        fakecuda::reset();
    }
    return ok;
}

template <class F>
bool eventually(F done) {
    for (int i = 0; i < 500; ++i) {
        if (done()) {
            return true;
        }
        std::this_thread::sleep_for(10ms);
    }
    return done();
}

} // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);
BOOST_FIXTURE_TEST_SUITE(copy_blocks_stream_order_on_the_fake_driver, fakecuda::clean_driver)

// The engine copies a sequence's blocks to another cache on s1 and frees the source sequence on
// s2 right after: the source memory stays mapped until s1 has run the copy, and its ids, handed
// out again at once, are written (on s3) only after it; then the memory goes back.
BOOST_AUTO_TEST_CASE_TEMPLATE(freeing_the_source_on_another_stream_waits_for_the_copy, Case, kv_cases) {
    two_caches<Case> made;
    auto [a, from] = filled_sequence(made.src, 4, 0x31);
    auto [d, to] = filled_sequence(made.dst, 4, 0x00);
    fakecuda::stream s1, s2, s3;
    fakecuda::hold_gpu(true);
    vmmpp::copy_blocks(made.src, from, made.dst, to, s1);
    BOOST_TEST(fakecuda::queued_on(s1) > 0u);  // queued, not run
    const std::size_t mapped = fakecuda::mapped_bytes();
    made.src.free(a, s2);
    fakecuda::run_stream(s2);  // s2 is done, s1 (the copy) is not
    (void)made.src.collect();
    (void)made.src.pool().trim();
    std::this_thread::sleep_for(10ms);  // (a release agent would act now)
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(made.src.pool().stats().awaiting_gpu_units > 0u);
    const auto n = made.src.add_sequence();
    made.src.append(n, geom.block_tokens * 4, s3);  // the same ids, lowest first
    const std::vector<std::int32_t> reused(made.src.block_table(n).begin(), made.src.block_table(n).end());
    BOOST_TEST(reused == from);
    for (auto b : reused) {
        write_block(made.src, b, 0x99, s3);
    }
    fakecuda::run_stream(s3);
    BOOST_TEST(fakecuda::queued_on(s3) > 0u);  // the writes wait for the copy
    fakecuda::run_stream(s1);
    BOOST_TEST(no_fault());
    for (auto b : to) {
        BOOST_TEST(differing(made.dst, b, 0x31) == 0u);  // the copy read the old KV
    }
    made.src.free(n, s3);
    fakecuda::run_gpu();  // the writes, and the free's fence
    (void)made.src.collect();
    (void)made.src.pool().trim();
    BOOST_TEST(eventually([&] { return fakecuda::mapped_bytes() < mapped; }));  // the memory goes back after the copy
    BOOST_TEST(made.src.pool().stats().awaiting_gpu_units == 0u);
    fakecuda::hold_gpu(false);
    (void)d;
}

// The same for the destination: freed on s2 while the copy into it is queued on s1.
BOOST_AUTO_TEST_CASE_TEMPLATE(freeing_the_destination_on_another_stream_waits_for_the_copy, Case, kv_cases) {
    two_caches<Case> made;
    auto [a, from] = filled_sequence(made.src, 4, 0x32);
    auto [d, to] = filled_sequence(made.dst, 4, 0x00);
    fakecuda::stream s1, s2;
    fakecuda::hold_gpu(true);
    vmmpp::copy_blocks(made.src, from, made.dst, to, s1);
    const std::size_t mapped = fakecuda::mapped_bytes();
    made.dst.free(d, s2);
    fakecuda::run_stream(s2);
    (void)made.dst.collect();
    (void)made.dst.pool().trim();
    std::this_thread::sleep_for(10ms);
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    BOOST_TEST(made.dst.pool().stats().awaiting_gpu_units > 0u);
    if (fakecuda::mapped_bytes() == mapped) {  // (reading unmapped memory would fault the test)
        for (auto b : to) {  // the copy has not written it yet
            BOOST_TEST(differing(made.dst, b, 0x00) == 0u);
        }
    }
    fakecuda::run_stream(s1);
    BOOST_TEST(no_fault());  // the copy wrote mapped memory
    (void)made.dst.collect();
    (void)made.dst.pool().trim();
    BOOST_TEST(eventually([&] { return fakecuda::mapped_bytes() < mapped; }));
    BOOST_TEST(made.dst.pool().stats().awaiting_gpu_units == 0u);
    fakecuda::hold_gpu(false);
    (void)a;
}

// The destination's ids were freed on s2 while s2 still reads them, and handed out again at once:
// the copy on s1 into them waits for those reads (it does not run when s1 runs alone), and the
// reads see the old KV.
BOOST_AUTO_TEST_CASE_TEMPLATE(a_reused_destination_block_is_written_after_its_old_readers, Case, kv_cases) {
    two_caches<Case> made;
    auto [a, from] = filled_sequence(made.src, 4, 0x33);
    auto [old, old_blocks] = filled_sequence(made.dst, 4, 0x41);
    fakecuda::stream s1, s2;
    queued_reads reads(s2);
    fakecuda::hold_gpu(true);
    for (std::int32_t b : old_blocks) {
        reads.read_block(made.dst, b, piece);
    }
    made.dst.free(old, s2);
    const auto d = made.dst.add_sequence();
    made.dst.append(d, geom.block_tokens * 4);  // the same ids, lowest first
    const std::vector<std::int32_t> to(made.dst.block_table(d).begin(), made.dst.block_table(d).end());
    BOOST_TEST(to == old_blocks);
    vmmpp::copy_blocks(made.src, from, made.dst, to, s1);
    fakecuda::run_stream(s1);
    BOOST_TEST(fakecuda::queued_on(s1) > 0u);  // the copy waits for s2's reads
    fakecuda::run_gpu();
    BOOST_TEST(no_fault());
    BOOST_TEST(reads.differing(0x41) == 0u);  // the reads saw the old KV
    for (auto b : to) {
        BOOST_TEST(differing(made.dst, b, 0x33) == 0u);
    }
    fakecuda::hold_gpu(false);
    (void)a;
}

// Within one cache, one fence covers both sides: freeing the source on s2 waits for the copy.
BOOST_AUTO_TEST_CASE(a_copy_within_one_cache_holds_its_source_until_it_ran) {
    using Case = kv_case<vmmpp::elastic_page_config, vmmpp::block_major>;
    two_caches<Case> made;
    auto& c = made.src;
    auto [a, from] = filled_sequence(c, 4, 0x34);
    auto [d, to] = filled_sequence(c, 4, 0x00);
    fakecuda::stream s1, s2;
    fakecuda::hold_gpu(true);
    const std::uint64_t fences = c.pool().stats().fences;
    vmmpp::copy_blocks(c, from, c, to, s1);
    BOOST_TEST(c.pool().stats().fences == fences + 1);
    const std::size_t mapped = fakecuda::mapped_bytes();
    c.free(a, s2);
    fakecuda::run_stream(s2);
    (void)c.pool().trim();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    fakecuda::run_stream(s1);
    BOOST_TEST(no_fault());
    for (auto b : to) {
        BOOST_TEST(differing(c, b, 0x34) == 0u);
    }
    (void)c.pool().trim();
    BOOST_TEST(eventually([&] { return fakecuda::mapped_bytes() < mapped; }));
    fakecuda::hold_gpu(false);
    (void)d;
}

// A copy that fails part-way (the driver refuses its second piece) throws cuda_error; the piece
// queued before the failure still holds both sides' memory until it ran.
BOOST_AUTO_TEST_CASE(a_copy_that_fails_part_way_fences_what_it_queued) {
    using Case = kv_case<vmmpp::elastic_page_config, vmmpp::layer_major>;  // a piece per layer and part
    two_caches<Case> made;
    auto [a, from] = filled_sequence(made.src, 4, 0x35);
    auto [d, to] = filled_sequence(made.dst, 4, 0x00);
    fakecuda::stream s1, s2;
    fakecuda::hold_gpu(true);
    fakecuda::fail("cuMemcpyAsync", 2, CUDA_ERROR_INVALID_VALUE);
    BOOST_CHECK_THROW(vmmpp::copy_blocks(made.src, from, made.dst, to, s1), vmmpp::cuda_error);
    BOOST_TEST(fakecuda::queued_on(s1) > 0u);  // the first piece
    const std::size_t mapped = fakecuda::mapped_bytes();
    made.src.free(a, s2);
    made.dst.free(d, s2);
    fakecuda::run_stream(s2);
    (void)made.src.pool().trim();
    (void)made.dst.pool().trim();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);
    fakecuda::run_gpu();
    BOOST_TEST(no_fault());
    (void)made.src.pool().trim();
    (void)made.dst.pool().trim();
    BOOST_TEST(eventually([&] { return fakecuda::mapped_bytes() < mapped; }));
    fakecuda::hold_gpu(false);
}

BOOST_AUTO_TEST_SUITE_END()
