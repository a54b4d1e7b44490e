// Must not compile: a type that is no backing used as one.
#include "vmmpp/config.hpp"
struct not_a_backing {};
using wrong = vmmpp::pool_config<not_a_backing, vmmpp::page_granular, vmmpp::unlimited>;
int main() { return sizeof(wrong); }
