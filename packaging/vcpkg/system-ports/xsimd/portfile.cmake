# Stand-in for vcpkg's xsimd port, which downloads its sources: uses the Debian package libxsimd-dev.
set(VCPKG_BUILD_TYPE release)
set(VCPKG_POLICY_EMPTY_INCLUDE_FOLDER enabled)
include("${CMAKE_CURRENT_LIST_DIR}/../system-package.cmake")
vcpkg_system_package(NAME xsimd DEBIAN libxsimd-dev DESTINATION xsimd
  CONFIG_DIRS /usr/lib/x86_64-linux-gnu/cmake/xsimd /usr/lib/aarch64-linux-gnu/cmake/xsimd /usr/lib/cmake/xsimd /usr/share/cmake/xsimd)
