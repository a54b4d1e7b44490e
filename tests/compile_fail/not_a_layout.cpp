// Must not compile: a type that is no KV layout used as one.
#include "vmmpp/config.hpp"
#include "vmmpp/kv/cache.hpp"
struct not_a_layout {};
using wrong = vmmpp::kv_cache<vmmpp::host_config, not_a_layout>;
int main() { return sizeof(wrong); }
