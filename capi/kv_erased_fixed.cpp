// capi/kv_erased_fixed.cpp: the caches of the static, gh200 and host configurations (host also under budgets)
// in every layout (kv_erased_impl.hpp's config_caches), in a translation unit of their own.
#include "kv_erased_impl.hpp"

namespace vmmpp::erased::detail {
template struct config_caches<vmmpp::static_config>;
template struct config_caches<vmmpp::gh200_config>;
template struct config_caches<vmmpp::host_config>;
} // namespace vmmpp::erased::detail
