// examples/torch_allocator's span_allocator on the host backing, with events the test
// completes by hand: 512-byte blocks carved first fit, pages held while blocks live, a freed
// block neither reused nor its pages released before its stream passes the free, coalescing,
// waiting for pending frees when the span is full, refusals, and threads.
#define BOOST_TEST_MODULE span allocator
#include "support/cpu_main.hpp"

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "span_allocator.hpp"
#include "vmmpp/config.hpp"

namespace {

constexpr std::size_t page = std::size_t{2} << 20;

/// Events a test completes: record() remembers the stream, complete(stream) marks every event
/// recorded on it done, wait() completes one (as cudaEventSynchronize would, once the stream
/// gets there).
class manual_events {
public:
    using stream_type = int;
    using event_type = std::uint64_t;

    struct state {
        std::mutex mutex;
        std::uint64_t next = 1;
        std::map<std::uint64_t, int> open;  // event -> stream, not done yet
        std::set<std::uint64_t> done;
        std::size_t recorded = 0, waits = 0, recycled = 0;
        bool automatic = false;  // every event is done at once (a stream with no work queued)
    };
    std::shared_ptr<state> s = std::make_shared<state>();

    event_type record(stream_type stream) {
        std::lock_guard lock(s->mutex);
        const event_type e = s->next++;
        ++s->recorded;
        if (s->automatic) {
            s->done.insert(e);
        } else {
            s->open.emplace(e, stream);
        }
        return e;
    }
    bool done(event_type e) {
        std::lock_guard lock(s->mutex);
        return s->done.contains(e);
    }
    void wait(event_type e) {
        std::lock_guard lock(s->mutex);
        ++s->waits;
        s->open.erase(e);
        s->done.insert(e);
    }
    void recycle(event_type e) noexcept {
        std::lock_guard lock(s->mutex);
        ++s->recycled;
        s->done.erase(e);
    }
    /// The stream got past everything recorded on it so far.
    void complete(int stream) {
        std::lock_guard lock(s->mutex);
        for (auto it = s->open.begin(); it != s->open.end();) {
            if (it->second == stream) {
                s->done.insert(it->first);
                it = s->open.erase(it);
            } else {
                ++it;
            }
        }
    }
};
static_assert(vmmpp_torch::event_policy<manual_events>);

using host_pool_config = vmmpp::pool_config<vmmpp::host, vmmpp::page_granular, vmmpp::unlimited>;
using allocator = vmmpp_torch::span_allocator<host_pool_config, manual_events>;

std::size_t offset_of(const allocator& a, void* p) {
    return static_cast<std::size_t>(static_cast<std::byte*>(p) - a.pool().base());
}

} // namespace

BOOST_AUTO_TEST_CASE(blocks_are_aligned_packed_and_committed) {
    allocator a(4 * page);
    void* p = a.allocate(1, 0);
    void* q = a.allocate(513, 0);
    void* r = a.allocate(512, 0);
    BOOST_TEST(offset_of(a, p) == 0u);
    BOOST_TEST(offset_of(a, q) == 512u);
    BOOST_TEST(offset_of(a, r) == 1536u);
    BOOST_TEST(a.allocate(0, 0) == nullptr);
    std::memset(q, 0xab, 513);  // committed: writable
    auto s = a.stats();
    BOOST_TEST(s.live_blocks == 3u);
    BOOST_TEST(s.live_bytes == 512u + 1024u + 512u);
    BOOST_TEST(s.committed_bytes == page);
    void* big = a.allocate(page + 1, 0);  // pages 0..1 (page 0 shared with the small blocks)
    BOOST_TEST(offset_of(a, big) == 2048u);
    BOOST_TEST(a.stats().committed_bytes == 2 * page);
    std::memset(big, 1, page + 1);
}

BOOST_AUTO_TEST_CASE(a_freed_block_waits_for_its_stream) {
    allocator a(4 * page);
    void* p = a.allocate(page, /*stream*/ 1);
    a.deallocate(p, page, 1);
    auto s = a.stats();
    BOOST_TEST(s.pending_frees == 1u);
    BOOST_TEST(s.pending_bytes == page);
    BOOST_TEST(s.live_blocks == 0u);
    BOOST_TEST(s.committed_bytes == page);  // work on stream 1 may still use it
    // Not reused while stream 1 has not passed the free.
    void* q = a.allocate(page, 2);
    BOOST_TEST(q != p);
    BOOST_TEST(offset_of(a, q) == page);
    // Stream 1 passes it: the next call completes the free; the block is reused first fit.
    a.events().complete(1);
    void* r = a.allocate(512, 2);
    BOOST_TEST(r == p);
    s = a.stats();
    BOOST_TEST(s.pending_frees == 0u);
    BOOST_TEST(s.committed_bytes == 2 * page);
    BOOST_TEST(a.events().s->recycled == 1u);
}

BOOST_AUTO_TEST_CASE(pages_go_back_when_frees_complete_and_ranges_coalesce) {
    allocator a(8 * page);
    std::vector<void*> blocks;
    for (int i = 0; i < 6; ++i) {
        blocks.push_back(a.allocate(page, 0));
    }
    BOOST_TEST(a.stats().committed_bytes == 6 * page);
    for (int i : {1, 3, 2, 5, 0, 4}) {  // out of order: neighbours merge on both sides
        a.deallocate(blocks[static_cast<std::size_t>(i)], page, 0);
    }
    BOOST_TEST(a.stats().committed_bytes == 6 * page);
    a.events().complete(0);
    BOOST_TEST(a.reclaim() == 6u);
    const auto s = a.stats();
    BOOST_TEST(s.committed_bytes == 0u);
    BOOST_TEST(s.free_ranges == 1u);
    BOOST_TEST(s.largest_free == 8 * page);
    BOOST_TEST(s.peak_live_bytes == 6 * page);
    void* all = a.allocate(8 * page, 0);  // the whole span again, in one range
    BOOST_TEST(offset_of(a, all) == 0u);
}

BOOST_AUTO_TEST_CASE(a_full_span_waits_for_pending_frees) {
    allocator a(2 * page);
    void* p = a.allocate(2 * page, 1);
    a.deallocate(p, 2 * page, 1);
    void* q = a.allocate(page, 2);  // nothing else free: waits for stream 1, then reuses
    BOOST_TEST(q == p);
    BOOST_TEST(a.events().s->waits == 1u);
    BOOST_CHECK_THROW((void)a.allocate(2 * page, 2), vmmpp::out_of_memory);  // truly full
    BOOST_TEST(a.stats().live_blocks == 1u);
}

BOOST_AUTO_TEST_CASE(trim_waits_and_gives_spares_back) {
    allocator a(4 * page, {}, vmmpp::page_granular{.spare_pages = 4});
    void* p = a.allocate(3 * page, 1);
    a.deallocate(p, 3 * page, 1);
    BOOST_TEST(a.stats().committed_bytes == 3 * page);
    BOOST_TEST(a.trim() == 3 * page);  // waited for the free, then gave the spares back
    BOOST_TEST(a.stats().committed_bytes == 0u);
    BOOST_TEST(a.stats().pending_frees == 0u);
}

BOOST_AUTO_TEST_CASE(refusals_change_nothing) {
    allocator a(2 * page);
    void* p = a.allocate(1000, 0);
    int elsewhere = 0;
    BOOST_CHECK_THROW(a.deallocate(&elsewhere, 4, 0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(a.deallocate(static_cast<std::byte*>(p) + 512, 488, 0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(a.deallocate(p, 2000, 0), vmmpp::invalid_argument);  // not its size
    BOOST_CHECK_THROW((void)a.allocate(4 * page, 0), vmmpp::out_of_memory);
    BOOST_CHECK_THROW((void)a.allocate(~std::size_t{0}, 0), vmmpp::out_of_memory);
    BOOST_TEST(a.stats().live_blocks == 1u);
    a.deallocate(p, 1000, 0);
    BOOST_CHECK_THROW(a.deallocate(p, 1000, 0), vmmpp::invalid_argument);  // twice
    a.deallocate(nullptr, 0, 0);
    BOOST_TEST(a.stats().pending_frees == 1u);
}

BOOST_AUTO_TEST_CASE(threads_never_share_a_block) {
    allocator a(64 * page);
    a.events().s->automatic = true;  // streams with no queued work: frees complete at once
    constexpr int threads = 4, rounds = 2000;
    std::vector<std::thread> pool;
    std::atomic<int> errors{0};
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&a, &errors, t] {
            std::mt19937 rng(static_cast<unsigned>(t));
            std::vector<std::pair<unsigned char*, std::size_t>> mine;
            for (int i = 0; i < rounds; ++i) {
                if (mine.empty() || rng() % 3 != 0) {
                    const std::size_t bytes = 1 + rng() % (32 * 1024);
                    auto* p = static_cast<unsigned char*>(a.allocate(bytes, t));
                    std::memset(p, t + 1, bytes);
                    mine.emplace_back(p, bytes);
                } else {
                    const std::size_t k = rng() % mine.size();
                    auto [p, bytes] = mine[k];
                    for (std::size_t j = 0; j < bytes; j += 997) {
                        if (p[j] != static_cast<unsigned char>(t + 1)) {
                            ++errors;  // another thread wrote into this block
                            break;
                        }
                    }
                    a.deallocate(p, bytes, t);
                    mine[k] = mine.back();
                    mine.pop_back();
                }
            }
            for (auto [p, bytes] : mine) {
                a.deallocate(p, bytes, t);
            }
        });
    }
    for (auto& th : pool) {
        th.join();
    }
    BOOST_TEST(errors.load() == 0);
    a.reclaim();
    const auto s = a.stats();
    BOOST_TEST(s.live_blocks == 0u);
    BOOST_TEST(s.pending_frees == 0u);
    BOOST_TEST(s.committed_bytes == 0u);
    BOOST_TEST(s.free_ranges == 1u);
}
