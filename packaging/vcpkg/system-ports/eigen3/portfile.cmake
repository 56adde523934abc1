# Stand-in for vcpkg's eigen3 port, which downloads its sources: uses the Debian package libeigen3-dev.
set(VCPKG_BUILD_TYPE release)
set(VCPKG_POLICY_EMPTY_INCLUDE_FOLDER enabled)
include("${CMAKE_CURRENT_LIST_DIR}/../system-package.cmake")
vcpkg_system_package(NAME Eigen3 DEBIAN libeigen3-dev DESTINATION eigen3
  CONFIG_DIRS /usr/share/eigen3/cmake /usr/lib/cmake/eigen3 /usr/local/share/eigen3/cmake)
