# Stand-in for vcpkg's nlohmann-json port, which downloads its sources: uses the Debian package nlohmann-json3-dev.
set(VCPKG_BUILD_TYPE release)
set(VCPKG_POLICY_EMPTY_INCLUDE_FOLDER enabled)
include("${CMAKE_CURRENT_LIST_DIR}/../system-package.cmake")
vcpkg_system_package(NAME nlohmann_json DEBIAN nlohmann-json3-dev DESTINATION nlohmann_json
  CONFIG_DIRS /usr/share/cmake/nlohmann_json /usr/lib/cmake/nlohmann_json /usr/lib/x86_64-linux-gnu/cmake/nlohmann_json)
