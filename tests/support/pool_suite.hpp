// The pool behaviour suite, one body for every configuration. A test file defines
// `pool_configs` (a boost::mpl::list) before including this; the host configurations run in CI,
// the GPU ones on the GPU machine.
#pragma once

#include <boost/test/unit_test.hpp>

#include <random>
#include <string>
#include <vector>

#include "support/pool_factories.hpp"

BOOST_AUTO_TEST_CASE_TEMPLATE(hold_commits_and_release_gives_back, Config, pool_configs) {
    using namespace vmmpp_test;
    pool_factory<Config> factory;
    auto pool = factory.make(32 * page);
    BOOST_TEST(pool->capacity() == 32 * page);
    BOOST_TEST(pool->page_bytes() == page);
    std::vector<bool> held(32, false);
    BOOST_TEST(pool->committed_bytes() == expected_committed<Config>(*pool, held));

    // Two sub-page ranges share page 0; a range straddling pages 4 and 5.
    pool->ensure_committed(0, 4096);
    pool->ensure_committed(8192, 4096);
    pool->ensure_committed(5 * page - 100, 200);
    held[0] = held[4] = held[5] = true;
    BOOST_TEST(pool->is_committed(0, page));
    BOOST_TEST(pool->is_committed(4 * page, 2 * page));
    BOOST_TEST(pool->committed_bytes() == expected_committed<Config>(*pool, held));
    BOOST_TEST(pool->committed_bytes() == pool->backing().committed_bytes());
    BOOST_TEST(pool->stats().held_pages == 3u);

    pool->release(0, 4096);  // page 0 still held by the other range
    BOOST_TEST(pool->is_committed(0, page));
    pool->release(8192, 4096);
    held[0] = false;
    BOOST_TEST(pool->committed_bytes() == expected_committed<Config>(*pool, held));
    pool->release(5 * page - 100, 200);
    held[4] = held[5] = false;
    BOOST_TEST(pool->committed_bytes() == expected_committed<Config>(*pool, held));
    BOOST_TEST(pool->stats().held_pages == 0u);
    const auto s = pool->stats();
    BOOST_TEST(s.peak_committed >= s.committed);
    BOOST_TEST(s.commits >= 1u);
    BOOST_TEST(s.reserved == 32 * page);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(misuse_is_rejected_and_changes_nothing, Config, pool_configs) {
    using namespace vmmpp_test;
    pool_factory<Config> factory;
    auto pool = factory.make(8 * page);
    pool->ensure_committed(page, 100);
    const auto before = pool->stats();
    BOOST_CHECK_THROW(pool->release(3 * page, 100), vmmpp::invalid_argument);  // never held
    BOOST_CHECK_THROW(pool->ensure_committed(8 * page, 1), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(pool->ensure_committed(7 * page, 2 * page), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(pool->ensure_committed(0, 0), vmmpp::invalid_argument);
    BOOST_CHECK_THROW(pool->ensure_committed(page, SIZE_MAX), vmmpp::invalid_argument);
    pool->release(page, 100);
    BOOST_CHECK_THROW(pool->release(page, 100), vmmpp::invalid_argument);  // double release
    const auto after = pool->stats();
    BOOST_TEST(after.held_pages == 0u);
    BOOST_TEST(after.commits == before.commits);
    BOOST_TEST(pool->committed_bytes() == pool->backing().committed_bytes());
}

BOOST_AUTO_TEST_CASE_TEMPLATE(random_holds_match_a_reference_model, Config, pool_configs) {
    using namespace vmmpp_test;
    pool_factory<Config> factory;
    constexpr std::size_t pages = 24;
    auto pool = factory.make(pages * page);
    const unsigned seed = std::random_device{}();
    BOOST_TEST_MESSAGE("seed " << seed);
    std::mt19937_64 rng(seed);
    struct hold {
        std::size_t offset, bytes;
    };
    std::vector<hold> holds;
    std::vector<unsigned> model(pages, 0);  // holds per page
    for (int step = 0; step < 4000; ++step) {
        if (holds.empty() || rng() % 2 == 0) {
            const std::size_t offset = rng() % (pages * page - 1);
            const std::size_t bytes = 1 + rng() % std::min<std::size_t>(3 * page, pages * page - offset);
            pool->ensure_committed(offset, bytes);
            holds.push_back({offset, bytes});
            for (std::size_t p = offset / page; p <= (offset + bytes - 1) / page; ++p) {
                ++model[p];
            }
        } else {
            const std::size_t i = rng() % holds.size();
            const hold h = holds[i];
            holds[i] = holds.back();
            holds.pop_back();
            pool->release(h.offset, h.bytes);
            for (std::size_t p = h.offset / page; p <= (h.offset + h.bytes - 1) / page; ++p) {
                --model[p];
            }
        }
        std::vector<bool> held(pages);
        std::size_t held_pages = 0;
        for (std::size_t p = 0; p < pages; ++p) {
            held[p] = model[p] > 0;
            held_pages += held[p];
        }
        const std::size_t expected = expected_committed<Config>(*pool, held);
        if (pool->committed_bytes() != expected || pool->stats().held_pages != held_pages ||
            pool->backing().committed_bytes() != expected) {
            BOOST_FAIL("step " << step << " (seed " << seed << "): committed " << pool->committed_bytes()
                               << ", expected " << expected << ", held pages " << pool->stats().held_pages
                               << " vs " << held_pages);
        }
    }
    BOOST_TEST(pool->stats().commits >= 1u);
}
