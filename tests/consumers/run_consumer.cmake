# cmake -DMODE=find_package|add_subdirectory|fetchcontent -DSETTINGS=<file> -DCONFIG=<cfg>
#       -DWORK_DIR=<dir> -P run_consumer.cmake
# One packaging test (see CMakeLists.txt beside this file). Everything it makes lies under
# WORK_DIR, which it empties first, so each run starts from scratch.
cmake_minimum_required(VERSION 3.25)

foreach(var IN ITEMS MODE SETTINGS WORK_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
include("${SETTINGS}")
set(consumers "${CMAKE_CURRENT_LIST_DIR}")
if(NOT CONFIG)
  set(CONFIG Release)
endif()

# run(<what> <command>...): runs a command, shows its output, fails the test if it fails.
function(run what)
  string(JOIN " " shown ${ARGN})
  message(STATUS "${what}: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "FAILED: ${what} (exit ${rc})")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

# The options that give a nested configure this build's generator, compiler and dependencies.
set(configure_args -G "${GENERATOR}" "-DCMAKE_BUILD_TYPE=${CONFIG}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
if(GENERATOR_PLATFORM)
  list(APPEND configure_args -A "${GENERATOR_PLATFORM}")
endif()
if(GENERATOR_TOOLSET)
  list(APPEND configure_args -T "${GENERATOR_TOOLSET}")
endif()
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CUDA_TOOLKIT_ROOT)
  list(APPEND configure_args "-DCUDAToolkit_ROOT=${CUDA_TOOLKIT_ROOT}")
endif()
if(RANGE_V3_DIR)
  list(APPEND configure_args "-Drange-v3_DIR=${RANGE_V3_DIR}")
endif()
# The consumers' own options: compile_commands.json, to check the -std flags nvcc got, and the
# CUDA consumer (consumer.cu) where this build has a CUDA compiler, built with that one.
set(consumer_args -DCMAKE_EXPORT_COMPILE_COMMANDS=ON)
set(consumers_built vmmpp_consumer)
if(CUDA_COMPILER)
  list(APPEND configure_args "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}" "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}")
  list(APPEND consumer_args -DVMMPP_CONSUMER_CUDA=ON)
  list(APPEND consumers_built vmmpp_consumer_cu)
else()
  list(APPEND consumer_args -DVMMPP_CONSUMER_CUDA=OFF)
endif()

# build_and_run(<source dir> <build dir> <extra configure args>...): configures, builds and runs
# the consumers (C++, and CUDA where there is a CUDA compiler), whose output must begin with a
# line OK, and checks what they were built with.
function(build_and_run source build)
  run("configure consumer" ${CMAKE_COMMAND} -S "${source}" -B "${build}" ${configure_args} ${consumer_args} ${ARGN})
  run("build consumer" ${CMAKE_COMMAND} --build "${build}" --config "${CONFIG}")
  foreach(name IN LISTS consumers_built)
    file(GLOB_RECURSE exe LIST_DIRECTORIES false "${build}/${name}" "${build}/${name}.exe")
    if(NOT exe)
      message(FATAL_ERROR "FAILED: the build made no ${name} under ${build}")
    endif()
    list(GET exe 0 exe)
    check_runs_ok("${exe}")
  endforeach()
  check_toolkit("${build}")
  if(CUDA_COMPILER)
    check_cuda_dialect("${build}")
  endif()
endfunction()

# check_toolkit(<build dir>): the consumer found the CUDA toolkit this build found (its headers),
# not another one on the machine (FindCUDAToolkit falls back to /usr/local/cuda).
function(check_toolkit build)
  file(STRINGS "${build}/CMakeCache.txt" found REGEX "^FIND_PACKAGE_MESSAGE_DETAILS_CUDAToolkit:")
  # [include dir(s)][cudart][bin][version]; from CMake 3.31 the first is a list (include, cccl).
  if(NOT found MATCHES "=\\[([^];\\]*)")
    message(FATAL_ERROR "FAILED: the consumer's cache does not say which CUDA toolkit it found")
  endif()
  get_filename_component(found_include "${CMAKE_MATCH_1}" REALPATH)
  get_filename_component(root "${CUDA_TOOLKIT_ROOT}" REALPATH)
  string(FIND "${found_include}/" "${root}/" at)
  if(NOT at EQUAL 0)
    message(FATAL_ERROR "FAILED: the consumer found CUDA headers in ${found_include}, not under ${root}")
  endif()
  message(STATUS "the consumer found the CUDA toolkit under ${root}: ${found}")
endfunction()

# check_cuda_dialect(<build dir>): every CUDA source was compiled with exactly one -std, and it
# was -std=c++20 (from vmmpp::vmmpp, whatever the consumer asked for).
function(check_cuda_dialect build)
  if(NOT EXISTS "${build}/compile_commands.json")
    message(STATUS "no compile_commands.json (generator ${GENERATOR}): -std not checked")
    return()
  endif()
  file(READ "${build}/compile_commands.json" commands)
  string(JSON count LENGTH "${commands}")
  math(EXPR last "${count} - 1")
  set(checked 0)
  foreach(i RANGE ${last})
    string(JSON file GET "${commands}" ${i} file)
    if(NOT file MATCHES "\\.cu$")
      continue()
    endif()
    string(JSON command GET "${commands}" ${i} command)
    string(REGEX MATCHALL "(^| )-std=[^ ]+" stds "${command}")
    list(TRANSFORM stds STRIP)
    if(NOT stds STREQUAL "-std=c++20")
      message(FATAL_ERROR "FAILED: ${file} was compiled with [${stds}], not one -std=c++20:\n${command}")
    endif()
    math(EXPR checked "${checked} + 1")
  endforeach()
  if(checked EQUAL 0)
    message(FATAL_ERROR "FAILED: compile_commands.json lists no CUDA source")
  endif()
  message(STATUS "nvcc got one -std=c++20 for each of ${checked} CUDA source(s)")
endfunction()

function(check_runs_ok exe)
  run("run consumer" "${exe}")
  if(NOT run_output MATCHES "^OK\n")
    message(FATAL_ERROR "FAILED: ${exe} printed something other than OK")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

if(MODE STREQUAL "find_package")
  # Install vmmpp the way a packager would: its own configure, nothing but the library.
  set(prefix "${WORK_DIR}/prefix")
  run("configure vmmpp for install" ${CMAKE_COMMAND} -S "${VMMPP_SOURCE_DIR}" -B "${WORK_DIR}/vmmpp-build"
      ${configure_args} "-DCMAKE_INSTALL_PREFIX=${prefix}" -DVMMPP_INSTALL=ON -DVMMPP_BUILD_TESTS=OFF
      -DVMMPP_BUILD_BENCHMARKS=OFF -DVMMPP_BUILD_EXAMPLES=OFF)
  # The headers need no build; the vmmpp-budget tool (installed to bin/ on Linux) does.
  run("build vmmpp" ${CMAKE_COMMAND} --build "${WORK_DIR}/vmmpp-build" --config "${CONFIG}")
  run("install vmmpp" ${CMAKE_COMMAND} --install "${WORK_DIR}/vmmpp-build" --config "${CONFIG}")
  set(installed_tool)
  if(CMAKE_HOST_SYSTEM_NAME STREQUAL "Linux")
    set(installed_tool bin/vmmpp-budget)
  endif()
  foreach(file IN ITEMS include/vmmpp/backing/host.hpp share/vmmpp/cmake/vmmppConfig.cmake
                        share/vmmpp/cmake/vmmppConfigVersion.cmake share/vmmpp/cmake/vmmppTargets.cmake
                        share/pkgconfig/vmmpp.pc share/licenses/vmmpp/LICENSE ${installed_tool})
    if(NOT EXISTS "${prefix}/${file}")
      message(FATAL_ERROR "FAILED: the install has no ${file}")
    endif()
  endforeach()

  # The installed package, found through CMAKE_PREFIX_PATH like a consumer would.
  set(build "${WORK_DIR}/consumer-build")
  build_and_run("${consumers}/find_package" "${build}" "-DCMAKE_PREFIX_PATH=${prefix};${PREFIX_PATH}"
                "-DVMMPP_EXPECTED_VERSION=${VMMPP_VERSION}")
  file(STRINGS "${build}/CMakeCache.txt" found REGEX "^vmmpp_DIR:")
  if(NOT found STREQUAL "vmmpp_DIR:PATH=${prefix}/share/vmmpp/cmake")
    message(FATAL_ERROR "FAILED: the consumer found a vmmpp other than the one just installed: ${found}")
  endif()

  # The installed vmmpp.pc, for build systems that are not CMake.
  if(NOT PKG_CONFIG)
    message(FATAL_ERROR "FAILED: no pkg-config was found when this build was configured; install pkg-config")
  endif()
  set(ENV{PKG_CONFIG_PATH} "${prefix}/share/pkgconfig")
  run("pkg-config version" "${PKG_CONFIG}" --modversion vmmpp)
  if(NOT run_output STREQUAL "${VMMPP_VERSION}\n")
    message(FATAL_ERROR "FAILED: vmmpp.pc says version ${run_output}, the project ${VMMPP_VERSION}")
  endif()
  run("pkg-config cflags" "${PKG_CONFIG}" --cflags vmmpp)
  string(STRIP "${run_output}" cflags)
  # The .pc file is relocatable (prefix=${pcfiledir}/../..): compare the directory it names,
  # normalised, with the install prefix's include directory.
  set(named_include "")
  separate_arguments(cflags_list UNIX_COMMAND "${cflags}")
  foreach(flag IN LISTS cflags_list)
    if(flag MATCHES "^-I(.*)$")
      get_filename_component(dir "${CMAKE_MATCH_1}" REALPATH)
      get_filename_component(want "${prefix}/include" REALPATH)
      if(dir STREQUAL want)
        set(named_include "${dir}")
      endif()
    endif()
  endforeach()
  if(named_include STREQUAL "")
    message(FATAL_ERROR "FAILED: vmmpp.pc's Cflags (${cflags}) do not name the installed headers ${prefix}/include")
  endif()
  run("pkg-config libs" "${PKG_CONFIG}" --libs vmmpp)
  string(STRIP "${run_output}" libs)
  # Compile, link and run the consumers with those flags and nothing else (plus an rpath for the
  # -L directories, as the CUDA runtime's need not be on the loader's path).
  separate_arguments(cflags UNIX_COMMAND "${cflags}")
  separate_arguments(libs UNIX_COMMAND "${libs}")
  set(rpath_dirs "")
  foreach(flag IN LISTS libs)
    if(flag MATCHES "^-L(.+)")
      list(APPEND rpath_dirs "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  if(CXX_COMPILER_ID MATCHES "GNU|Clang")
    list(TRANSFORM rpath_dirs PREPEND "-Wl,-rpath," OUTPUT_VARIABLE rpaths)
    run("compile with pkg-config flags" "${CXX_COMPILER}" ${cflags} "${consumers}/consumer.cpp"
        -o "${WORK_DIR}/vmmpp_consumer_pc" ${libs} ${rpaths})
    check_runs_ok("${WORK_DIR}/vmmpp_consumer_pc")
  endif()
  if(CUDA_COMPILER)
    # The same flags are nvcc's: -std=c++20 and -I name the dialect and the headers, -L/-l the
    # runtime.
    list(TRANSFORM rpath_dirs PREPEND "-Xlinker=-rpath," OUTPUT_VARIABLE rpaths)
    run("compile consumer.cu with pkg-config flags" "${CUDA_COMPILER}" ${cflags} "${consumers}/consumer.cu"
        -o "${WORK_DIR}/vmmpp_consumer_cu_pc" ${libs} ${rpaths})
    check_runs_ok("${WORK_DIR}/vmmpp_consumer_cu_pc")
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  build_and_run("${consumers}/add_subdirectory" "${WORK_DIR}/consumer-build"
                "-DVMMPP_SOURCE_DIR=${VMMPP_SOURCE_DIR}" "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
elseif(MODE STREQUAL "fetchcontent")
  # A source archive of what a vendored vmmpp needs (a release archive has more; vmmpp must not
  # need it when it is not the top-level project), fetched by URL as FetchContent users do.
  set(archive "${WORK_DIR}/vmmpp-${VMMPP_VERSION}.tar.gz")
  execute_process(COMMAND ${CMAKE_COMMAND} -E tar czf "${archive}" CMakeLists.txt LICENSE cmake include
                  WORKING_DIRECTORY "${VMMPP_SOURCE_DIR}" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "FAILED: could not archive ${VMMPP_SOURCE_DIR} (exit ${rc})")
  endif()
  build_and_run("${consumers}/fetchcontent" "${WORK_DIR}/consumer-build"
                "-DVMMPP_URL=${archive}" "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE ${MODE}")
endif()
message(STATUS "consumer_${MODE}: OK")
