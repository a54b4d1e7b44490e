// vmmpp/quota/detail/segment_trust.hpp: the owner and mode checks on a budget segment.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <span>
#include <string>

#include "vmmpp/quota/budget_errors.hpp"

namespace vmmpp::detail::pb {

/// Whose segments this process uses: its effective uid's, and `trusted_owners`'; with
/// `allow_shared_write`, also those that group or others may write.
struct trust_policy {
    std::span<const uid_t> trusted_owners;
    bool allow_shared_write = false;
};

/// Why an object may not be trusted: its owner and mode, this process's effective uid, and a
/// phrase ("is owned by another user").
struct trust_refusal {
    uid_t owner = 0;
    uid_t self = 0;
    mode_t mode = 0;
    const char* why = "";
};

/// A refusal unless the object `st` describes is owned by this process's effective uid or by one
/// of `trusted_owners`.
/// Throws: nothing.
inline std::optional<trust_refusal> owner_refusal(const struct stat& st, std::span<const uid_t> trusted_owners) noexcept {
    const uid_t self = ::geteuid();
    if (st.st_uid != self && std::find(trusted_owners.begin(), trusted_owners.end(), st.st_uid) == trusted_owners.end()) {
        return trust_refusal{st.st_uid, self, st.st_mode, "is owned by another user"};
    }
    return std::nullopt;
}

/// A refusal unless the object `st` describes passes every check of trust: an accepted owner, and
/// no write permission for group or others unless the policy allows it.
/// Throws: vmmpp::invalid_argument if it is not a regular object.
inline std::optional<trust_refusal> trust_refusal_of(const std::string& name, const struct stat& st,
                                                     const trust_policy& policy) {
    if (!S_ISREG(st.st_mode)) {
        throw incompatible_segment("shared memory object '" + name + "' is not a regular object");
    }
    if (auto refusal = owner_refusal(st, policy.trusted_owners)) {
        return refusal;
    }
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && !policy.allow_shared_write) {
        return trust_refusal{st.st_uid, ::geteuid(), st.st_mode, "may be written by its group or others"};
    }
    return std::nullopt;
}

} // namespace vmmpp::detail::pb
