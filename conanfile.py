"""Conan 2 recipe for vmmpp, in conan-center's form for a header-only library.

vmmpp needs two things at build time that are not Conan packages here:

* The CUDA toolkit. Its headers (cuda.h, cuda_runtime_api.h) and the CUDA runtime (cudart)
  come from the toolkit installed on the machine, not from Conan. This package does not list
  them: a consumer finds the toolkit itself and links the runtime, in CMake with

      find_package(vmmpp CONFIG REQUIRED)
      find_package(CUDAToolkit REQUIRED)
      target_link_libraries(app PRIVATE vmmpp::vmmpp CUDA::cudart)

  (vmmpp's own CMake package, installed with `cmake --install`, does that for you; the one
  Conan's CMakeDeps writes cannot.) The CUDA driver (libcuda.so.1) is never linked: vmmpp
  loads it at run time with dlopen, hence the system library `dl`.
* C++20 in CUDA translation units too. vmmpp::vmmpp asks for it through a CMake build module
  (cmake/vmmppCudaDialect.cmake, run by the consumer's CMake: CMake 3.25 needs another way to
  say it than later versions), so an engine's .cu files that include vmmpp/vmmpp.hpp compile.
  Conan's cppstd setting covers C++ only.
* range-v3 0.12, a Conan requirement like any other; a profile may satisfy it from the system
  with `[platform_requires] range-v3/0.12.0` (see .ci/conan/profile).
"""
import os
import re

from conan import ConanFile
from conan.errors import ConanException, ConanInvalidConfiguration
from conan.tools.build import check_min_cppstd
from conan.tools.files import copy, load, save
from conan.tools.layout import basic_layout

required_conan_version = ">=2.0"


class VmmppConan(ConanFile):
    name = "vmmpp"
    description = "Elastic GPU KV cache for LLM inference engines (header-only, C++20)"
    license = "Apache-2.0"
    url = "https://github.com/vmmpp/vmmpp"
    homepage = "https://github.com/vmmpp/vmmpp"
    topics = ("cuda", "gpu", "kv-cache", "llm", "inference", "virtual-memory", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    exports_sources = "include/*", "LICENSE", "cmake/vmmppCudaDialect.cmake"
    no_copy_source = True

    # Where the package keeps the CMake build module that gives CUDA sources C++20.
    _cmake_dir = os.path.join("lib", "cmake", "vmmpp")
    _cuda_dialect_module = "conan-vmmpp-cuda-dialect.cmake"

    def set_version(self):
        # One source of truth: the version in project() of the top-level CMakeLists.txt.
        cmakelists = load(self, os.path.join(self.recipe_folder, "CMakeLists.txt"))
        match = re.search(r"project\(\s*vmmpp\s[^)]*?VERSION\s+(\d+\.\d+\.\d+)", cmakelists)
        if not match:
            raise ConanException("no `project(vmmpp VERSION x.y.z ...)` in CMakeLists.txt")
        self.version = self.version or match.group(1)

    def layout(self):
        basic_layout(self, src_folder=".")

    def requirements(self):
        # Public headers include range-v3's, so its include directories reach the consumer.
        self.requires("range-v3/0.12.0", transitive_headers=True)

    def package_id(self):
        self.info.clear()

    def validate(self):
        if self.settings.os != "Linux":
            # mmap/madvise for the host backing, dlopen of libcuda.so.1 for the driver.
            raise ConanInvalidConfiguration(f"{self.ref} supports Linux only")
        check_min_cppstd(self, 20)

    def source(self):
        pass  # the sources are exported with the recipe

    def build(self):
        pass  # header-only: nothing to build

    def package(self):
        copy(self, "LICENSE", src=self.source_folder, dst=os.path.join(self.package_folder, "licenses"))
        # Headers: ours (*.hpp) and the vendored DLPack header (*.h).
        for pattern in ("*.hpp", "*.h"):
            copy(self, pattern, src=os.path.join(self.source_folder, "include"),
                 dst=os.path.join(self.package_folder, "include"))
        # The CUDA dialect (see the docstring), applied by a build module that CMakeDeps includes
        # once it has made the vmmpp::vmmpp target.
        cmake_dir = os.path.join(self.package_folder, self._cmake_dir)
        copy(self, "vmmppCudaDialect.cmake", src=os.path.join(self.source_folder, "cmake"), dst=cmake_dir)
        save(self, os.path.join(cmake_dir, self._cuda_dialect_module),
             "# C++20 for the consumer's CUDA sources too (see vmmppCudaDialect.cmake).\n"
             "include(\"${CMAKE_CURRENT_LIST_DIR}/vmmppCudaDialect.cmake\")\n"
             "vmmpp_cuda_dialect(vmmpp::vmmpp)\n")

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "vmmpp")
        self.cpp_info.set_property("cmake_target_name", "vmmpp::vmmpp")
        self.cpp_info.set_property("pkg_config_name", "vmmpp")
        self.cpp_info.set_property("cmake_build_modules",
                                   [os.path.join(self._cmake_dir, self._cuda_dialect_module)])
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        # cudart is the CUDA toolkit's, not Conan's: the consumer finds CUDAToolkit and links
        # CUDA::cudart (see the docstring above). libdl is for dlopen of the CUDA driver.
        if self.settings.os == "Linux":
            self.cpp_info.system_libs = ["dl"]
