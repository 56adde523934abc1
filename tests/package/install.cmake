# Installs smear from BUILD_DIR into a fresh PREFIX (removed first) and checks the layout.
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" --config "${CONFIG}"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
foreach(f include/smear/smear.hpp include/smear/version.hpp include/smear/io/safetensors.hpp
          include/smear/io/checkpoint.hpp share/cmake/smear/smearConfig.cmake
          share/cmake/smear/smearConfigVersion.cmake share/cmake/smear/smearTargets.cmake
          share/cmake/smear/smearIoTargets.cmake share/doc/smear/LICENSE)
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "the install lacks ${f}")
  endif()
endforeach()
message(STATUS "smear installed into ${PREFIX}")
