// vmmpp/quota/budget_errors.hpp: the typed errors of budgets' names and segments, so that a
// caller (the vmmpp-budget tool, a serving system's admin endpoint) can tell a missing segment
// from a foreign one and an unknown model from a bad request. Each derives from
// vmmpp::invalid_argument, which callers caught before these existed.
#pragma once

#include <string>

#include "vmmpp/error.hpp"

namespace vmmpp {

/// No process budget segment has this name.
class no_such_segment : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

/// A shared-memory object with this name exists but is not a vmmpp process budget this vmmpp can
/// use: another program's object, an uninitialised one, another layout version or ABI, another
/// pid or time namespace. The message says which.
class incompatible_segment : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

/// No model of this name is registered with the budget.
class unknown_model : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

/// A model that live processes still hold a share of cannot be removed.
class model_in_use : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

} // namespace vmmpp
