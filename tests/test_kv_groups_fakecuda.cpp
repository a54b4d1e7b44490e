// KV groups on the fake driver (support/fakecuda; CI runs it for real): the stream order of what a
// sliding window and state slots let go of while the engine's steps still run. A block that left
// the window goes back, and is written again, only after the step that read it last; a state slot
// given back goes back after the last step that read it, and its next owner's stream waits for
// that step before writing; a fork's state copy runs after the parent's last write.
#define BOOST_TEST_MODULE kv groups on the fake driver
#include "support/cpu_main.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "support/fakecuda.hpp"
#include "support/queued_reads.hpp"
#include "vmmpp/config.hpp"
#include "vmmpp/groups/kv_groups.hpp"
#include "vmmpp/kv/cache.hpp"

namespace fakecuda = vmmpp_test::fakecuda;
using vmmpp_test::queued_reads;

namespace {

// 8 layers, 2 heads of 64, fp16, 16 tokens: a block_major block of 64 KiB, one page of the fake.
constexpr vmmpp::kv_geometry geom{.layers = 8, .kv_heads = 2, .head_dim = 64, .type = vmmpp::dtype::f16,
                                  .block_tokens = 16, .max_blocks = 64};
constexpr std::size_t piece = 16 * 2 * 64 * 2;
constexpr std::size_t page = std::size_t{64} << 10;
using cache_t = vmmpp::kv_cache<vmmpp::elastic_page_config, vmmpp::block_major>;
using slots_t = vmmpp::state_slots<vmmpp::elastic_page_config>;
constexpr std::size_t budget_bytes = std::size_t{16} << 20;

}  // namespace

using fakecuda::the_fake_driver_is_loaded;
BOOST_TEST_GLOBAL_FIXTURE(the_fake_driver_is_loaded);

BOOST_FIXTURE_TEST_SUITE(kv_groups_on_the_fake_driver, fakecuda::clean_driver)

BOOST_AUTO_TEST_CASE(a_block_that_left_the_window_goes_back_after_its_last_reader) {
    vmmpp::budget budget(budget_bytes);
    cache_t cache(geom, {}, {}, budget.register_model("kv", budget_bytes));
    vmmpp::sliding_window window(cache, 32);
    fakecuda::stream engine;
    const auto s = cache.add_sequence();
    cache.append(s, 64, engine);  // 4 blocks
    const std::int32_t first = cache.block_table(s)[0];

    fakecuda::hold_gpu(true);
    queued_reads step(engine);
    step.read_block(cache, first, piece);  // the step before still reads block 0
    const std::size_t mapped = fakecuda::mapped_bytes();
    BOOST_TEST(window.slide(s, engine) == 2u);  // the next query (64) reads (32, 64]: blocks 0-1 left
    (void)cache.collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // not under the queued read

    // The freed id goes to another sequence at once: its writes wait for the read.
    const auto t = cache.add_sequence();
    fakecuda::stream other;
    cache.append(t, 16, other);
    BOOST_TEST(cache.block_table(t)[0] == first);
    vmmpp_test::queue_block_write(cache, first, 0x33, piece, other);
    fakecuda::run_stream(other);  // the write waits for the engine's read: nothing runs
    BOOST_TEST(fakecuda::queued_on(other) > 0u);
    fakecuda::hold_gpu(false);
    fakecuda::run_gpu();
    BOOST_TEST(step.differing(0x33) == step.out.size() * piece);  // the read saw the old bytes
    cache.free(t, other);
    cache.free(s, engine);
    (void)cache.pool().synchronize();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);  // blocks 1-3 went back after their readers
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(a_state_slot_goes_back_and_is_rewritten_after_its_last_reader) {
    vmmpp::budget budget(budget_bytes);
    slots_t slots(page, 8, {}, {}, budget.register_model("state", budget_bytes));  // a slot a page
    fakecuda::stream engine, other;
    const auto a = slots.acquire(engine);
    std::memset(slots.data(a), 0x11, page);

    fakecuda::hold_gpu(true);
    queued_reads step(engine);
    step.read(slots.data(a), page);  // the last step reads the state
    const std::size_t mapped = fakecuda::mapped_bytes();
    slots.release(a, engine);
    (void)slots.pool().collect();
    BOOST_TEST(fakecuda::mapped_bytes() == mapped);  // not under the queued read

    const auto b = slots.acquire(other);  // the same slot, for a new sequence on another stream
    BOOST_TEST(b == a);
    static std::vector<unsigned char> zeros(page, 0);
    vmmpp_test::queue_copy_from_host(slots.data(b), zeros.data(), page, other);
    fakecuda::run_stream(other);  // the new owner's initialisation waits for the old read
    BOOST_TEST(fakecuda::queued_on(other) > 0u);
    fakecuda::hold_gpu(false);
    fakecuda::run_gpu();
    BOOST_TEST(step.differing(0x11) == 0u);  // the read saw the old state
    slots.release(b, other);
    (void)slots.pool().synchronize();
    BOOST_TEST(fakecuda::mapped_bytes() < mapped);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_CASE(a_forked_state_is_copied_after_the_parents_last_write) {
    vmmpp::budget budget(budget_bytes);
    slots_t slots(page, 8, {}, {}, budget.register_model("state", budget_bytes));
    fakecuda::stream engine, other;
    const auto a = slots.acquire(engine);
    std::memset(slots.data(a), 0x11, page);

    fakecuda::hold_gpu(true);
    static std::vector<unsigned char> step_state(page, 0x42);
    vmmpp_test::queue_copy_from_host(slots.data(a), step_state.data(), page, engine);
    const auto b = slots.fork(a, engine);  // queued after the step's write
    slots.release(a, other);  // the parent ends on a stream with nothing queued: its slot waits for the copy
    fakecuda::run_stream(other);  // (its fence completes)

    // The parent's slot goes to a new sequence on a third stream: its initialisation waits for the
    // fork's copy, which still has to read the parent's state.
    fakecuda::stream third;
    const auto c = slots.acquire(third);
    BOOST_TEST(c == a);
    static std::vector<unsigned char> zeros(page, 0);
    vmmpp_test::queue_copy_from_host(slots.data(c), zeros.data(), page, third);
    fakecuda::run_stream(third);
    BOOST_TEST(fakecuda::queued_on(third) > 0u);
    fakecuda::hold_gpu(false);
    fakecuda::run_gpu();
    std::vector<unsigned char> got(page);
    std::memcpy(got.data(), slots.data(b), page);
    BOOST_TEST(std::count(got.begin(), got.end(), 0x42) == static_cast<std::ptrdiff_t>(page));  // the step's state
    slots.release(b, engine);
    slots.release(c, third);
    BOOST_TEST(fakecuda::sticky_error() == CUDA_SUCCESS);
}

BOOST_AUTO_TEST_SUITE_END()
