# Shared by the stand-in ports beside this file (eigen3, xsimd, nlohmann-json): instead of
# downloading and building the library, the port installs a CMake package config into the vcpkg
# tree that forwards to the one the system's (Debian's) -dev package installed. A consumer's
# find_package(<Name>) then resolves through the vcpkg installed tree (<Name>_DIR points there)
# to the system headers, which is what smear's smearConfig.cmake needs.
#
#   vcpkg_system_package(NAME <CMake package name> DEBIAN <package> CONFIG_DIRS <dir>...
#                        [DESTINATION <dir under share/>])
#
# The port's "version" is what Debian 12 ships; another version on the system is reported, not
# refused (the version that find_package checks is the system config's own).
function(vcpkg_system_package)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME;DEBIAN;DESTINATION" "CONFIG_DIRS")
  if(NOT arg_DESTINATION)
    set(arg_DESTINATION "${PORT}")
  endif()
  set(config_dir "")
  foreach(dir IN LISTS arg_CONFIG_DIRS)
    if(EXISTS "${dir}/${arg_NAME}Config.cmake")
      set(config_dir "${dir}")
      break()
    endif()
  endforeach()
  if(NOT config_dir)
    message(FATAL_ERROR "${PORT} (system stand-in): no ${arg_NAME}Config.cmake in ${arg_CONFIG_DIRS}; "
                        "install the Debian package ${arg_DEBIAN} (apt-get install ${arg_DEBIAN})")
  endif()
  set(system_version "unknown")
  if(EXISTS "${config_dir}/${arg_NAME}ConfigVersion.cmake")
    file(STRINGS "${config_dir}/${arg_NAME}ConfigVersion.cmake" version_line
         REGEX "^set\\(PACKAGE_VERSION \"[^\"]+\"\\)" LIMIT_COUNT 1)
    string(REGEX REPLACE "^set\\(PACKAGE_VERSION \"([^\"]+)\"\\)" "\\1" system_version "${version_line}")
  endif()
  message(STATUS "${PORT}: forwarding ${arg_NAME} to ${config_dir} (system version ${system_version}, port version ${VERSION})")
  if(NOT system_version STREQUAL VERSION)
    message(WARNING "${PORT}: the system's ${arg_NAME} is ${system_version}, this stand-in port says ${VERSION}")
  endif()

  set(dest "${CURRENT_PACKAGES_DIR}/share/${arg_DESTINATION}")
  file(WRITE "${dest}/${arg_NAME}Config.cmake"
    "# vcpkg stand-in port ${PORT}: forwards to the system package (Debian ${arg_DEBIAN}).\n"
    "include(\"${config_dir}/${arg_NAME}Config.cmake\")\n")
  if(EXISTS "${config_dir}/${arg_NAME}ConfigVersion.cmake")
    file(WRITE "${dest}/${arg_NAME}ConfigVersion.cmake"
      "include(\"${config_dir}/${arg_NAME}ConfigVersion.cmake\")\n")
  endif()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/usage"
    "${PORT} is a stand-in for the system package ${arg_DEBIAN} (${arg_NAME} ${system_version} in ${config_dir}):\n\n"
    "  find_package(${arg_NAME} CONFIG REQUIRED)\n")
  if(EXISTS "/usr/share/doc/${arg_DEBIAN}/copyright")
    file(INSTALL "/usr/share/doc/${arg_DEBIAN}/copyright" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
  else()
    file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright"
      "Stand-in for the system package ${arg_DEBIAN}; see its own license.\n")
  endif()
endfunction()
