# vmmpp_warnings: the strict warnings of vmmpp's own targets (tests, benchmarks, examples, the
# header check), for C++ and for CUDA (nvcc, and the host compiler it drives). Not part of
# vmmpp::vmmpp: a consumer keeps its own warning flags. Included by CMakeLists.txt when vmmpp
# builds its own targets, and by tests/headers when that is configured on its own.
include_guard(GLOBAL)

add_library(vmmpp_warnings INTERFACE)
target_compile_options(vmmpp_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>
  $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror>)
# GCC 12 at -O2 reports -Wrestrict inside libstdc++'s std::string operator+ (GCC bug 105329).
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  target_compile_options(vmmpp_warnings INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-Wno-restrict> $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wno-restrict>)
endif()
