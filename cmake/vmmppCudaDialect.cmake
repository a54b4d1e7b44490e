# vmmpp_cuda_dialect(<target> [BUILD_INTERFACE])
#
# Makes <target> (vmmpp's INTERFACE library) ask for C++20 in the CUDA translation units that
# link it, as cxx_std_20 does for C++ ones: vmmpp's headers use concepts, and nvcc compiles
# C++17 unless told otherwise. Called by vmmpp's CMakeLists.txt (vendored: add_subdirectory,
# FetchContent), by the installed vmmppConfig.cmake, and by the build module of the Conan package,
# so the decision below is always taken by the CMake that builds the consumer, not the one that
# installed vmmpp. Harmless to a consumer without CUDA sources.
#
# - CMake 3.26 and later know that nvcc 12 and later take -std=c++20: the compile feature
#   cuda_std_20 is the right tool. CMake resolves it with the consumer's own CUDA_STANDARD or
#   CMAKE_CUDA_STANDARD (the highest wins) and passes exactly one -std.
# - CMake 3.25 does not: with nvcc it knows C++17 at most, so cuda_std_20 is an error ("not known
#   to CUDA compiler NVIDIA"), and a CUDA standard of 20 (the consumer's, or the one vmmpp's
#   cxx_std_20 implies for CUDA too) decays to nvcc's default with no flag at all. There the flag
#   is passed by hand, for CUDA sources only. It is the only -std while CMake 3.25 passes none of
#   its own, i.e. while the target's CUDA standard is unset or 20 and not REQUIRED (CUDA inherits
#   CXX_STANDARD_REQUIRED). A REQUIRED one fails at generate time ("requires the language dialect
#   CUDA20"); an explicit lower one (CUDA_STANDARD 17 REQUIRED, or 14) is passed after ours, nvcc
#   warns "incompatible redefinition for option 'std'" and takes the last, and vmmpp/vmmpp.hpp
#   stops with "vmmpp needs C++20". README, "Using it in a project", says what to set.
#
# BUILD_INTERFACE wraps the requirement in $<BUILD_INTERFACE:...> so that install(EXPORT) does not
# write it into vmmppTargets.cmake: the installed vmmppConfig.cmake calls this function again,
# under the consumer's CMake, which may be older or newer than the one that installed vmmpp.
include_guard(GLOBAL)

function(vmmpp_cuda_dialect target)
  set(open "")
  set(close "")
  if(ARGC GREATER 1)
    if(NOT ARGV1 STREQUAL "BUILD_INTERFACE" OR ARGC GREATER 2)
      message(FATAL_ERROR "vmmpp_cuda_dialect(<target> [BUILD_INTERFACE]): unexpected arguments ${ARGN}")
    endif()
    set(open "$<BUILD_INTERFACE:")
    set(close ">")
  endif()
  # Once per target: a second find_package(vmmpp) in the same directory reuses the target.
  get_target_property(done ${target} VMMPP_CUDA_DIALECT)
  if(done)
    return()
  endif()
  set_target_properties(${target} PROPERTIES VMMPP_CUDA_DIALECT ON)
  if(CMAKE_VERSION VERSION_LESS 3.26)
    target_compile_options(${target} INTERFACE "${open}$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>${close}")
  else()
    target_compile_features(${target} INTERFACE "${open}cuda_std_20${close}")
  endif()
endfunction()
