// vmmpp/pool/agent.hpp: the seam between a pool and what works on it in the background.
// A pool tells its agent what happens (a unit taken, a unit idle, a release, a hint) through a
// few hooks; the agent gives memory back or maps ahead through the pool's own commit and
// decommit paths (vmmpp/pool/books.hpp). Which agent a pool has follows from its
// configuration:
//
//   | pool                              | agent                                            |
//   | growth maps in the background     | mapper_agent (vmmpp/pool/mapper_agent.hpp)       |
//   | elastic, thread safe              | release_agent_client (release_agent_client.hpp)  |
//   | preallocated, or single-threaded  | no_agent: every hook does nothing                |
#pragma once

#include <concepts>
#include <cstddef>
#include <mutex>
#include <span>
#include <type_traits>

#include "vmmpp/pool/release_agent_client.hpp"
#include "vmmpp/growth/mapped_ahead.hpp"
#include "vmmpp/pool/mapper_agent.hpp"
#include "vmmpp/pool_config.hpp"

namespace vmmpp::detail {

/// What a pool's agent answers to. Events come with the pool's lock held; `start` comes once the
/// pool is built, `stop` before it is torn down (without the lock).
/// - on_taken(u), on_idle(u): a caller took unit u / unit u became a spare.
/// - on_missed(): a caller had to commit memory itself (no spare where it needed one).
/// - after_release(fences): a release gave back what the growth policy lets go at once; what
///   stays waits for `fences` (the agent may see to it later).
/// - will_need(first, last): a caller's hint that those units come next.
/// - stop_refilling(): the pool gave its spares back (pressure): map nothing ahead for now.
/// - commit_started(n), commit_finished(n): the agent's own commit has n units in flight.
/// - wait_for_in_flight(lock): a caller needs a unit the agent has in flight: wait for it to settle.
/// - calls_backing_unlocked: the agent calls the backing without the pool's lock.
template <class A>
concept pool_agent = requires(A& a, std::size_t u, std::span<const pool_fence> fences,
                              std::unique_lock<typename A::mutex_type>& lock) {
    { A::calls_backing_unlocked } -> std::convertible_to<bool>;
    a.on_taken(u);
    a.on_idle(u);
    a.on_missed();
    a.after_release(fences);
    a.will_need(u, u);
    a.stop_refilling();
    a.commit_started(u);
    a.commit_finished(u);
    a.wait_for_in_flight(lock);
    a.start();
    a.stop();
};

/// The agent of a pool that needs none: a preallocated pool (nothing goes back), or one used from
/// a single thread (nothing may enter it from another). Every hook does nothing.
template <class Books>
struct no_agent {
    using mutex_type = typename Books::mutex_type;
    static constexpr bool calls_backing_unlocked = false;
    explicit no_agent(Books&) noexcept {}
    void on_taken(std::size_t) noexcept {}
    void on_idle(std::size_t) noexcept {}
    void on_missed() noexcept {}
    void after_release(std::span<const pool_fence>) noexcept {}
    void will_need(std::size_t, std::size_t) noexcept {}
    void stop_refilling() noexcept {}
    void commit_started(std::size_t) noexcept {}
    void commit_finished(std::size_t) noexcept {}
    void wait_for_in_flight(std::unique_lock<mutex_type>&) noexcept {}  // nothing is ever in flight
    void start() noexcept {}
    void stop() noexcept {}
};

/// The agent a pool of configuration `Config` has (the table above).
template <class Config>
struct pool_agent_for {
    using growth_type = typename Config::growth_type;
    template <class Books>
    using type = std::conditional_t<
        background_growth_policy<growth_type>, mapper_agent<Books>,
        std::conditional_t<growth_type::is_elastic && !std::is_same_v<typename Config::mutex_type, null_mutex>,
                           release_agent_client<Books>, no_agent<Books>>>;
};

} // namespace vmmpp::detail
