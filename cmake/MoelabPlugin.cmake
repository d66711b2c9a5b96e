# moelab_add_plugin(NAME KIND SOURCES ... [LIBRARIES ...] [OUTPUT_DIR dir] [NO_INSTALL])
# moelab_add_conformance_test(NAME KIND [ARGS ...]): a ctest test, conformance_NAME, that runs
# `moelab test-plugin NAME --kind KIND --path <the plugin's build folder> ARGS...`.
# Builds one plugin as a loadable module named moelab_<kind>_<name>.so. Used both in this tree
# and, through find_package(moelab), by out-of-tree plugins. KIND: router, experts, balancer, kernel, comm.
include_guard(GLOBAL)

function(moelab_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>)
    if(MOELAB_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
    endif()
  endif()
endfunction()

function(moelab_add_plugin name kind)
  cmake_parse_arguments(ARG "NO_INSTALL" "OUTPUT_DIR" "SOURCES;LIBRARIES" ${ARGN})
  if(NOT kind MATCHES "^(router|experts|balancer|kernel|comm)$")
    message(FATAL_ERROR "moelab_add_plugin(${name} ${kind}): KIND must be router, experts, balancer, kernel or comm")
  endif()
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "moelab_add_plugin(${name} ${kind}): no SOURCES given")
  endif()
  set(target moelab_${kind}_${name})
  add_library(${target} MODULE ${ARG_SOURCES})
  if(TARGET moelab::moelab)
    target_link_libraries(${target} PRIVATE moelab::moelab ${ARG_LIBRARIES})
  else()
    target_link_libraries(${target} PRIVATE moelab ${ARG_LIBRARIES})
  endif()
  set_target_properties(${target} PROPERTIES PREFIX "lib" CXX_VISIBILITY_PRESET hidden)
  if(ARG_OUTPUT_DIR)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY "${ARG_OUTPUT_DIR}")
  elseif(DEFINED MOELAB_PLUGIN_OUTPUT_DIR)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY "${MOELAB_PLUGIN_OUTPUT_DIR}")
  endif()
  if(COMMAND moelab_warnings)
    moelab_warnings(${target})
  endif()
  if(NOT ARG_NO_INSTALL AND DEFINED MOELAB_PLUGIN_INSTALL_DIR)
    # Installed in-tree plugins live in <prefix>/lib/moelab/plugins and find libmoelab two levels up
    # (the loading process has usually loaded it already; this covers tools such as ldd).
    set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../..")
    install(TARGETS ${target} LIBRARY DESTINATION "${MOELAB_PLUGIN_INSTALL_DIR}")
  endif()
  # The plugins of the build's own plugin folder (what a full build must have made before tests
  # run); fixture plugins built elsewhere with OUTPUT_DIR are not among them.
  if(NOT ARG_OUTPUT_DIR)
    set_property(GLOBAL APPEND PROPERTY MOELAB_PLUGIN_TARGETS ${target})
  endif()
endfunction()

# The conformance kit on a plugin built by moelab_add_plugin: `moelab test-plugin` (the moelab of
# this build tree, or the installed one found by find_package(moelab)) with the plugin's folder on
# its search path.
function(moelab_add_conformance_test name kind)
  set(target moelab_${kind}_${name})
  if(TARGET moelab_cli)
    set(moelab_command "$<TARGET_FILE:moelab_cli>")
  elseif(DEFINED MOELAB_EXECUTABLE)
    set(moelab_command "${MOELAB_EXECUTABLE}")
  else()
    message(FATAL_ERROR "moelab_add_conformance_test(${name} ${kind}): no moelab executable (find_package(moelab) sets MOELAB_EXECUTABLE)")
  endif()
  add_test(NAME conformance_${name}
           COMMAND "${moelab_command}" test-plugin ${name} --kind ${kind} --path "$<TARGET_FILE_DIR:${target}>" ${ARGN})
endfunction()
