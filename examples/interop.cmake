# examples/interop.cmake: the C ABI library over kv_cache (examples/torch_kv/vmmpp_kv_capi.cpp),
# which both examples/torch_kv (the PyTorch program) and tests/python (the NumPy test) load from
# Python. Included by both; the target is defined once, by whichever directory comes first, and
# lands in <build>/interop/libvmmpp_kv_capi.so.
include_guard(GLOBAL)

add_library(vmmpp_kv_capi SHARED ${CMAKE_CURRENT_LIST_DIR}/torch_kv/vmmpp_kv_capi.cpp)
target_include_directories(vmmpp_kv_capi PUBLIC ${CMAKE_CURRENT_LIST_DIR}/torch_kv)
target_link_libraries(vmmpp_kv_capi PRIVATE vmmpp::vmmpp vmmpp_warnings)
# Only the C ABI is exported (VMMPP_KV_API): vmmpp's inline functions stay inside the library.
set_target_properties(vmmpp_kv_capi PROPERTIES
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON
  LIBRARY_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/interop)

# vmmpp_add_torch_test(<name> <script> <ENV=value> [args...]): a gpu-labelled ctest running
# <script> [args...] with the python3 on PATH when the test runs (a build is carried to a GPU
# machine as it is). Without python3 there, or without torch or a GPU (the scripts exit 77),
# ctest reports it skipped.
function(vmmpp_add_torch_test name script environment)
  if(NOT VMMPP_BUILD_TESTS)
    return()
  endif()
  add_test(NAME ${name}
           COMMAND sh -c "command -v python3 >/dev/null || { echo 'no python3: skipping'; exit 77; }; exec python3 \"$0\" \"$@\""
                   ${script} ${ARGN})
  set_tests_properties(${name} PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 ENVIRONMENT "${environment}")
endfunction()
