// vmmpp/quota/detail/reclaim_dead.hpp: takes back the records and bytes of dead processes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"

namespace vmmpp::detail::pb {

/// Frees the records of every dead process (is_process_running, which also catches this
/// process's records from before an exec) and gives their bytes back. Returns the bytes.
/// Liveness is read from /proc without the lock (a dead identity never comes back to life).
/// Throws: vmmpp::error if the lock cannot be taken; std::bad_alloc.
/// Thread safety: any threads of any processes at once.
inline std::size_t reclaim_dead(const segment& s) {
    const process_identity me = s.self();
    std::vector<process_identity> others;
    {
        std::lock_guard lock(s.mutex());
        const record_slot* r = s.records();
        for (std::uint32_t i = 0; i < s.max_records(); ++i) {
            const process_identity id = identity_of(r[i]);
            if (r[i].pid != 0 && id != me && std::find(others.begin(), others.end(), id) == others.end()) {
                others.push_back(id);
            }
        }
    }
    std::vector<process_identity> dead;
    for (const auto& id : others) {
        if (!is_process_running(id)) {
            dead.push_back(id);
        }
    }
    if (dead.empty()) {
        return 0;
    }
    std::size_t reclaimed = 0;
    std::lock_guard lock(s.mutex());
    header& h = s.head();
    record_slot* r = s.records();
    for (std::uint32_t i = 0; i < s.max_records(); ++i) {
        if (r[i].pid == 0 || std::find(dead.begin(), dead.end(), identity_of(r[i])) == dead.end()) {
            continue;
        }
        const std::uint64_t bytes = r[i].bytes;
        r[i].bytes = 0;
        ordered();
        r[i].pid = 0;
        ordered();
        if (model_slot* m = s.model_of(r[i])) {
            m->committed -= std::min(bytes, m->committed);
        }
        h.committed -= std::min<std::uint64_t>(bytes, h.committed);
        h.reclaimed_bytes += bytes;
        ++h.reclaimed_records;
        reclaimed += bytes;
    }
    return reclaimed;
}

} // namespace vmmpp::detail::pb
