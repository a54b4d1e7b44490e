// vmmpp/pool/release_agent_client.hpp: the agent of an elastic, thread-safe pool without a
// mapper of its own (vmmpp/pool/agent.hpp): memory whose release waited for the GPU goes
// back when the GPU gets there, on the process-wide release agent's thread
// (vmmpp/detail/release_agent.hpp), without a later call from the engine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>

#include "vmmpp/detail/fence_queue.hpp"
#include "vmmpp/detail/release_agent.hpp"
#include "vmmpp/pool_config.hpp"

namespace vmmpp::detail {

/// Books: the pool's detail::pool_books.
template <class Books>
class release_agent_client {
public:
    using mutex_type = typename Books::mutex_type;
    static constexpr bool calls_backing_unlocked = false;

    explicit release_agent_client(Books& books) noexcept : books_(books) {}
    release_agent_client(const release_agent_client&) = delete;
    release_agent_client& operator=(const release_agent_client&) = delete;

    /// Memory of this release waits for `after` and no later call may come: the release agent
    /// gives it back when the GPU gets there, woken by a host function behind each fence not
    /// complete (one per stream at a time: if one is outstanding, the agent polls for the rest
    /// after it fired). A failure to queue one leaves the memory to the next call.
    void after_release(std::span<const pool_fence> after) noexcept {
        const std::size_t keep = books_.growth.idle_units_to_keep(books_.table.committed, books_.table.idle.size());
        if (books_.table.idle.size() <= keep || !books_.idle_memory_awaits_gpu()) {
            return;
        }
        for (const pool_fence& f : after) {
            const fence waited{f.lane, f.value};
            if (!books_.fences.needs_host_function(waited)) {
                continue;
            }
            try {
                auto& agent = release_agent::instance();
                if (client_ == 0) {
                    client_ = agent.add([this](std::uint32_t lane) { return collect(lane); });
                }
                books_.fences.on_stream_of(waited.lane,
                                           [&](CUstream stream) { agent.call_when_reached(stream, client_, waited.lane); });
                ++books_.stats.agent_wakeups;
            } catch (...) {
                books_.fences.host_function_done(waited.lane);  // none queued: the memory goes back on the next call
            }
        }
    }

    /// Leaves the release agent; waits for a call of it in progress. Without the pool's lock.
    void stop() noexcept {
        if (client_ != 0) {
            release_agent::instance().remove(client_);
            client_ = 0;
        }
    }

    void on_taken(std::size_t) noexcept {}
    void on_idle(std::size_t) noexcept {}
    void on_missed() noexcept {}
    void will_need(std::size_t, std::size_t) noexcept {}
    void stop_refilling() noexcept {}
    void commit_started(std::size_t) noexcept {}
    void commit_finished(std::size_t) noexcept {}
    void wait_for_in_flight(std::unique_lock<mutex_type>&) noexcept {}  // it maps nothing itself
    void start() noexcept {}

private:
    /// The release agent's call, on its thread: the host function behind lane `lane` has run
    /// (or, with release_agent::no_tag, a poll). Gives back what may go; returns whether idle
    /// memory still waits for the GPU (the agent then polls again shortly).
    bool collect(std::uint32_t lane) noexcept {
        try {
            std::lock_guard lock(books_.mutex);
            if (lane != release_agent::no_tag) {
                books_.fences.host_function_done(lane);
            }
            books_.stats.agent_released += books_.give_back_beyond_keep();
            const std::size_t keep = books_.growth.idle_units_to_keep(books_.table.committed, books_.table.idle.size());
            return books_.table.idle.size() > keep && books_.idle_memory_awaits_gpu();
        } catch (...) {
            return false;  // a lost context or a failed decommit: counted in stats; the next call tries again
        }
    }

    Books& books_;
    std::uint64_t client_ = 0;  // this pool's id with the release agent, once it needed it
};

} // namespace vmmpp::detail
