# cmake -DPREFIX=... -DKIND=... -DNAME=... -DWORK=... [-DGENERATOR=...] [-DCXX_COMPILER=...]
#       [-DCXX_FLAGS=...] [-DBUILD_TYPE=...] -P scaffold_plugin.cmake
# `moelab new KIND NAME` from the installation in PREFIX, then build, test and find the plugin.
include("${CMAKE_CURRENT_LIST_DIR}/sdk_common.cmake")
set(moelab "${PREFIX}/bin/moelab")
set(project "${WORK}/${NAME}")
set(build "${WORK}/build")
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

sdk_run(STEP "moelab new" COMMAND "${moelab}" new ${KIND} ${NAME} "${project}")
foreach(file ${NAME}.cpp test_${NAME}.cpp CMakeLists.txt README.md)
  if(NOT EXISTS "${project}/${file}")
    message(FATAL_ERROR "moelab new: ${project}/${file} was not written")
  endif()
endforeach()
# A second time into the same, now non-empty, folder is refused and changes nothing.
file(SHA256 "${project}/${NAME}.cpp" before)
sdk_run(STEP "moelab new into a non-empty folder" EXPECT_EXIT 2 COMMAND "${moelab}" new ${KIND} ${NAME} "${project}")
sdk_expect_contains("moelab new into a non-empty folder" "${sdk_stderr}" "already exists and is not empty")
file(SHA256 "${project}/${NAME}.cpp" after)
if(NOT before STREQUAL after)
  message(FATAL_ERROR "moelab new overwrote ${project}/${NAME}.cpp")
endif()

if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()
set(configure_args -S "${project}" -B "${build}" "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" -DMOELAB_WARNINGS_AS_ERRORS=ON)
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
sdk_run(STEP "configure the scaffolded project" COMMAND "${CMAKE_COMMAND}" ${configure_args})
sdk_run(STEP "build the scaffolded project" COMMAND "${CMAKE_COMMAND}" --build "${build}")
sdk_run(STEP "the scaffolded project's test" COMMAND "${CMAKE_CTEST_COMMAND}" --test-dir "${build}" --output-on-failure)
# Its tests include moelab's conformance kit (moelab test-plugin through moelab_add_conformance_test).
sdk_expect_contains("the scaffolded project's test" "${sdk_stdout}" "conformance_${NAME} ")
sdk_expect_contains("the scaffolded project's test" "${sdk_stdout}" "100% tests passed")

# The installed moelab finds the new plugin through MOELAB_PLUGIN_PATH, with no warnings.
sdk_run(STEP "moelab plugins --describe" COMMAND "${CMAKE_COMMAND}" -E env "MOELAB_PLUGIN_PATH=${build}"
        "${moelab}" plugins --describe ${NAME})
sdk_expect_contains("moelab plugins --describe" "${sdk_stdout}" "${KIND} ${NAME} 0.1.0")
sdk_expect_contains("moelab plugins --describe" "${sdk_stdout}" "libmoelab_${KIND}_${NAME}.so")
if(NOT sdk_stderr STREQUAL "")
  message(FATAL_ERROR "moelab plugins --describe ${NAME}: unexpected warnings:\n${sdk_stderr}")
endif()
message(STATUS "${KIND} plugin ${NAME}: scaffolded, built, tested and found")
