# smear_project_options: what smear's own targets (tests, examples, benchmarks) build with.
# Never attached to smear::smear itself, so users' builds keep their own flags.
add_library(smear_project_options INTERFACE)
target_compile_options(smear_project_options INTERFACE
  -Wall -Wextra -Wpedantic -Wconversion -Wshadow
  $<$<BOOL:${SMEAR_WERROR}>:-Werror>)
if(SMEAR_SANITIZE)
  target_compile_options(smear_project_options INTERFACE
    -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_link_options(smear_project_options INTERFACE -fsanitize=address,undefined)
endif()
