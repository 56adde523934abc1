# Overlay port building the smear tree this port sits in (packaging/vcpkg/smear):
#   vcpkg install smear --overlay-ports=<smear>/packaging/vcpkg/smear
# A port for a registry would take the sources from a release instead, e.g.
#   vcpkg_from_github(OUT_SOURCE_PATH SOURCE_PATH REPO <owner>/smear REF "v${VERSION}" SHA512 <...>)
set(VCPKG_BUILD_TYPE release)  # header-only
get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    cuda SMEAR_CUDA
  INVERTED_FEATURES
    io CMAKE_DISABLE_FIND_PACKAGE_nlohmann_json
)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    -DSMEAR_BUILD_TESTS=OFF
    -DSMEAR_BUILD_EXAMPLES=OFF
    -DSMEAR_BUILD_BENCHMARKS=OFF
    -DSMEAR_BUILD_PYTHON=OFF  # on by default for a top-level build: would compile the pybind11 module
    -DSMEAR_INSTALL=ON
    -DSMEAR_INSTALL_CMAKEDIR=share/smear
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup()

file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/share/doc")
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
