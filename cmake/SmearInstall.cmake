# Install and export rules: headers, the smear::smear target (and smear::io, smear::mpi, smear::cuda when
# they exist), smearConfig.cmake and smearConfigVersion.cmake. Header-only, so the package is
# architecture independent and goes under share/.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(SMEAR_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/smear"
    CACHE STRING "Where smearConfig.cmake is installed, relative to the prefix")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/smear" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS smear EXPORT smearTargets INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(EXPORT smearTargets NAMESPACE smear:: DESTINATION "${SMEAR_INSTALL_CMAKEDIR}")

if(TARGET smear_io)
  install(TARGETS smear_io EXPORT smearIoTargets)
  install(EXPORT smearIoTargets NAMESPACE smear:: DESTINATION "${SMEAR_INSTALL_CMAKEDIR}")
endif()
if(TARGET smear_mpi)
  install(TARGETS smear_mpi EXPORT smearMpiTargets)
  install(EXPORT smearMpiTargets NAMESPACE smear:: DESTINATION "${SMEAR_INSTALL_CMAKEDIR}")
endif()
# A CUDA backend target, when the build defines one, becomes the optional `cuda` component.
if(TARGET smear_cuda)
  set_target_properties(smear_cuda PROPERTIES EXPORT_NAME cuda)
  install(TARGETS smear_cuda EXPORT smearCudaTargets)
  install(EXPORT smearCudaTargets NAMESPACE smear:: DESTINATION "${SMEAR_INSTALL_CMAKEDIR}")
endif()

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/smearConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/smearConfig.cmake"
  INSTALL_DESTINATION "${SMEAR_INSTALL_CMAKEDIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/smearConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/smearConfig.cmake" "${PROJECT_BINARY_DIR}/smearConfigVersion.cmake"
              "${PROJECT_SOURCE_DIR}/cmake/SmearDependencies.cmake"
              "${PROJECT_SOURCE_DIR}/cmake/SmearCccl.cmake"
        DESTINATION "${SMEAR_INSTALL_CMAKEDIR}")
install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DATADIR}/doc/smear")
