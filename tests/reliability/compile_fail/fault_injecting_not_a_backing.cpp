// Must not compile: fault_injecting over a type that is no backing.
#include "vmmpp/backing/fault_injecting.hpp"
struct not_a_backing {};
int main() { return sizeof(vmmpp::fault_injecting<not_a_backing>); }
