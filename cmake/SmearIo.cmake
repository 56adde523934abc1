# smear::io: the checkpoint headers (include/smear/io/), which need nlohmann/json on top of
# smear::smear. Defined only when nlohmann_json is found, so the core never requires it.
find_package(nlohmann_json 3.2 QUIET CONFIG)
if(nlohmann_json_FOUND)
  add_library(smear_io INTERFACE)
  add_library(smear::io ALIAS smear_io)
  set_target_properties(smear_io PROPERTIES EXPORT_NAME io)
  target_link_libraries(smear_io INTERFACE smear nlohmann_json::nlohmann_json)
else()
  message(STATUS "smear: nlohmann_json not found, smear::io (safetensors checkpoints) disabled")
endif()
