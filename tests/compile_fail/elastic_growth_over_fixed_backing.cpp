// Must not compile: page-granular growth over the fixed device backing.
#include "vmmpp/config.hpp"
using wrong = vmmpp::pool_config<vmmpp::device, vmmpp::page_granular, vmmpp::unlimited>;
int main() { return sizeof(wrong); }
