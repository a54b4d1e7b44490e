// vmmpp/quota/detail/share_registration.hpp: registering a share, and holding its record.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "vmmpp/error.hpp"
#include "vmmpp/quota/detail/budget_layout.hpp"
#include "vmmpp/quota/detail/budget_share.hpp"
#include "vmmpp/quota/detail/process_identity.hpp"
#include "vmmpp/quota/detail/reclaim_dead.hpp"
#include "vmmpp/quota/detail/shared_segment.hpp"

namespace vmmpp::detail::pb {

/// Registers model `name` for process `who` in `s` and returns its share. The first registration
/// (by any process) creates the model with `limit`; later ones join it and must state the same
/// limit. A process that registers a model twice gets its one record again. `watching`: whether
/// `who` runs a watcher that serves reclaim requests (segment::serving_requests), so that others
/// may ask it for its spares. When the record table
/// is full, the records of dead processes are freed and it tries once more.
/// Throws: vmmpp::invalid_argument for a name that is not 1 to 63 bytes without NUL, a zero limit,
/// or a limit other than the model's; vmmpp::error when the model table or the record table is
/// full, or the lock cannot be taken.
/// Thread safety: any threads of any processes at once.
inline share register_share(std::shared_ptr<const segment> segment_ptr, std::string_view name, std::size_t limit,
                            const process_identity& who, bool watching = false) {
    if (name.empty() || name.size() >= name_capacity || name.find('\0') != std::string_view::npos) {
        throw invalid_argument("model name '" + std::string(name) + "' must be 1 to " +
                               std::to_string(name_capacity - 1) + " bytes without NUL");
    }
    if (limit == 0) {
        throw invalid_argument("model '" + std::string(name) + "' needs a non-zero limit");
    }
    const segment& s = *segment_ptr;
    for (int attempt = 0;; ++attempt) {
        {
            std::lock_guard lock(s.mutex());
            model_slot* m = s.models();
            record_slot* r = s.records();
            std::uint32_t model = s.max_models();
            std::uint32_t free_model = s.max_models();
            for (std::uint32_t i = 0; i < s.max_models(); ++i) {
                if (m[i].name[0] == '\0') {
                    free_model = std::min(free_model, i);
                } else if (name == slot_name(m[i])) {
                    model = i;
                    break;
                }
            }
            if (model < s.max_models()) {
                if (m[model].registered_limit != limit) {
                    throw invalid_argument("model '" + std::string(name) + "' is registered with limit " +
                                           std::to_string(m[model].registered_limit) + " bytes in process budget '" + s.name() +
                                           "', not " + std::to_string(limit));
                }
                for (std::uint32_t i = 0; i < s.max_records(); ++i) {
                    if (owns(r[i], who, model)) {
                        r[i].watching = r[i].watching != 0 || watching ? 1 : 0;
                        return share(segment_ptr, model, i, who, std::string(name));
                    }
                }
            } else if (free_model == s.max_models()) {
                throw error("vmmpp process budget '" + s.name() + "' has no room for model '" + std::string(name) +
                            "': all " + std::to_string(s.max_models()) +
                            " model slots are taken (process_budget_options::max_models)");
            }
            std::uint32_t record = s.max_records();
            for (std::uint32_t i = 0; i < s.max_records(); ++i) {
                if (r[i].pid == 0) {
                    record = i;
                    break;
                }
            }
            if (record < s.max_records()) {
                if (model == s.max_models()) {
                    model = free_model;
                    model_slot& slot = m[model];
                    slot.limit = limit;
                    slot.committed = 0;
                    slot.peak = 0;
                    slot.denied = 0;
                    slot.registered_limit = limit;
                    slot.generation = 0;
                    slot.reclaims = 0;
                    slot.reclaimed = 0;
                    std::memset(slot.name, 0, sizeof slot.name);
                    std::memcpy(slot.name + 1, name.data() + 1, name.size() - 1);
                    ordered();
                    slot.name[0] = name[0];  // the slot is taken from this store on
                }
                r[record].start_time = who.start_time;
                r[record].image = who.image;
                r[record].model = model;
                r[record].bytes = 0;
                r[record].spares = 0;
                r[record].answered = s.head().requests;  // nothing asked before it exists
                r[record].watching = watching ? 1 : 0;
                r[record].asking_model = 0;
                r[record].asking_global = 0;
                r[record].asking_pages = 0;
                ordered();
                r[record].pid = who.pid;  // the record is taken from this store on
                return share(segment_ptr, model, record, who, std::string(name));
            }
            if (attempt > 0) {
                throw error("vmmpp process budget '" + s.name() + "' has no free usage record for model '" +
                            std::string(name) + "': all " + std::to_string(s.max_records()) +
                            " are held by live processes (process_budget_options::max_records)");
            }
        }
        reclaim_dead(s);
    }
}

/// This process's hold on its usage record of one model: every process_quota of that (model,
/// process) shares one, and the last to go frees the record, giving back what it still holds, so
/// that remove_model can remove an unloaded model and a reload may state another limit. The model
/// slot stays (see process_budget::register_model).
/// Thread safety: made and destroyed under the registry's holds_mutex order (register_held).
class record_hold {
public:
    record_hold() noexcept = default;
    record_hold(const record_hold&) = delete;
    record_hold& operator=(const record_hold&) = delete;
    ~record_hold() {
        if (!share_) {
            return;  // made for a registration that found a hold already, or failed
        }
        const share& sh = *share_;
        const segment& s = sh.seg();
        std::lock_guard holds(s.local().holds_mutex);
        std::weak_ptr<record_hold>& slot = s.local().holds[sh.record()];
        if (!slot.expired()) {
            return;  // a registration after this hold expired took the record over
        }
        slot.reset();
        if (::getpid() != sh.who().pid || s.mutex().lock_or_error() != 0) {
            return;  // a fork's copy: the record is the parent's; or no lock: death frees it
        }
        std::lock_guard lock(s.mutex(), std::adopt_lock);
        record_slot& r = s.records()[sh.record()];
        if (!owns(r, sh.who(), sh.model())) {
            return;  // freed already (this process was taken for dead)
        }
        const std::uint64_t bytes = r.bytes;
        r.bytes = 0;  // the record first, as reclaim_dead: repair() rebuilds the totals from it
        ordered();
        r.pid = 0;
        ordered();
        model_slot& m = s.models()[sh.model()];
        m.committed -= std::min(bytes, m.committed);
        header& h = s.head();
        h.committed -= std::min<std::uint64_t>(bytes, h.committed);
    }

private:
    friend std::pair<share, std::shared_ptr<record_hold>> register_held(const std::shared_ptr<const segment>&,
                                                                         std::string_view, std::size_t,
                                                                         const process_identity&, bool);
    std::optional<share> share_;
};

/// register_share for `who`, and this process's hold on the record: the one its other quotas of
/// the model hold, or a new one.
/// Throws: as register_share; std::bad_alloc (nothing changed).
inline std::pair<share, std::shared_ptr<record_hold>> register_held(const std::shared_ptr<const segment>& s,
                                                                    std::string_view name, std::size_t limit,
                                                                    const process_identity& who, bool watching) {
    local_registry& reg = s->local();
    auto fresh = std::make_shared<record_hold>();  // before the record is taken: nothing to undo
    std::lock_guard holds(reg.holds_mutex);
    reg.holds.resize(std::max<std::size_t>(reg.holds.size(), s->max_records()));
    share sh = register_share(s, name, limit, who, watching);
    std::weak_ptr<record_hold>& slot = reg.holds[sh.record()];
    std::shared_ptr<record_hold> held = slot.lock();
    if (!held) {
        fresh->share_.emplace(sh);
        slot = fresh;
        held = std::move(fresh);
    }
    return {std::move(sh), std::move(held)};
}

} // namespace vmmpp::detail::pb
