# Conan 2 recipe for smear, a header-only library. Build the package from this repository:
#   conan create packaging/conan
# (see the README's "Installing" section, also for using the Debian packages of Eigen and xsimd).
import os

from conan import ConanFile
from conan.errors import ConanInvalidConfiguration
from conan.tools.build import check_min_cppstd
from conan.tools.files import copy, load
from conan.tools.layout import basic_layout

required_conan_version = ">=2.0"


class SmearConan(ConanFile):
    name = "smear"
    description = "SMEAR: Soft Merging of Experts with Adaptive Routing, a header-only C++20 library"
    license = "MIT"
    topics = ("mixture-of-experts", "deep-learning", "header-only", "safetensors")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {"io": [True, False], "cuda": [True, False]}
    default_options = {"io": True, "cuda": False}
    no_copy_source = True

    def _root(self):
        return os.path.join(self.recipe_folder, "..", "..")

    def set_version(self):
        # the single source of truth: include/smear/version.hpp
        text = load(self, os.path.join(self._root(), "include", "smear", "version.hpp"))
        parts = {}
        for line in text.splitlines():
            for key in ("MAJOR", "MINOR", "PATCH"):
                prefix = "#define SMEAR_VERSION_" + key + " "
                if line.startswith(prefix):
                    parts[key] = line[len(prefix):].strip()
        self.version = self.version or "{MAJOR}.{MINOR}.{PATCH}".format(**parts)

    def export_sources(self):
        copy(self, "include/*", self._root(), self.export_sources_folder)
        copy(self, "LICENSE", self._root(), self.export_sources_folder)

    def layout(self):
        basic_layout(self, src_folder=".")

    def requirements(self):
        self.requires("eigen/3.4.0")
        self.requires("xsimd/8.1.0")
        if self.options.io:
            self.requires("nlohmann_json/3.11.2")

    def package_id(self):
        self.info.clear()

    def validate(self):
        if self.settings.get_safe("compiler.cppstd"):
            check_min_cppstd(self, 20)
        if self.options.cuda and self.settings.os not in ("Linux", "Windows"):
            raise ConanInvalidConfiguration("smear's CUDA backend needs Linux or Windows")

    def package(self):
        copy(self, "LICENSE", self.source_folder, os.path.join(self.package_folder, "licenses"))
        # every header, whatever the options: they only decide the requirements and components,
        # so one package serves all (package_id() clears the options)
        copy(self, "*.hpp", os.path.join(self.source_folder, "include"), os.path.join(self.package_folder, "include"))

    def _targets(self, *wanted):
        # Dependencies taken from the system through a profile's [platform_requires] have no
        # Conan-generated targets: the consumer finds them itself (see test_package).
        present = {dep.ref.name for dep in self.dependencies.host.values()}
        return [t for t in wanted if t.split("::")[0] in present]

    def package_info(self):
        # the same CMake names as smear's own smearConfig.cmake
        self.cpp_info.set_property("cmake_file_name", "smear")
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []

        core = self.cpp_info.components["core"]
        core.set_property("cmake_target_name", "smear::smear")
        core.requires = self._targets("eigen::eigen", "xsimd::xsimd")
        if self.settings.os in ("Linux", "FreeBSD"):
            core.system_libs = ["pthread"]  # the cpu backend's thread pool
        core.bindirs = []
        core.libdirs = []
        if self.options.io:
            io = self.cpp_info.components["io"]
            io.set_property("cmake_target_name", "smear::io")
            io.requires = ["core"] + self._targets("nlohmann_json::nlohmann_json")
            io.bindirs = []
            io.libdirs = []
        if self.options.cuda:
            cuda = self.cpp_info.components["cuda"]
            cuda.set_property("cmake_target_name", "smear::cuda")
            cuda.requires = ["core"]
            cuda.system_libs = ["cudart", "cublas"]  # from the CUDA toolkit on the system
            cuda.bindirs = []
            cuda.libdirs = []
