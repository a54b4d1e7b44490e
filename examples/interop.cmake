# examples/interop.cmake: vmmpp_add_torch_test, for the examples that run a Python program (the
# C ABI library they load, vmmpp_kv_capi, is defined in capi/).
include_guard(GLOBAL)

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
