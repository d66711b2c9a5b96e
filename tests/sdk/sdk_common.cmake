# sdk_run(STEP <what> [EXPECT_EXIT n] COMMAND ...): runs a command; on an unexpected exit status
# stops the test with the step, the command and everything it printed. Sets sdk_stdout/sdk_stderr.
function(sdk_run)
  cmake_parse_arguments(ARG "" "STEP;EXPECT_EXIT" "COMMAND" ${ARGN})
  if(NOT DEFINED ARG_EXPECT_EXIT)
    set(ARG_EXPECT_EXIT 0)
  endif()
  execute_process(COMMAND ${ARG_COMMAND} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT "${status}" STREQUAL "${ARG_EXPECT_EXIT}")
    list(JOIN ARG_COMMAND " " shown)
    message(FATAL_ERROR "${ARG_STEP}: expected exit status ${ARG_EXPECT_EXIT}, got '${status}'\n"
                        "command: ${shown}\n--- stdout\n${out}\n--- stderr\n${err}")
  endif()
  set(sdk_stdout "${out}" PARENT_SCOPE)
  set(sdk_stderr "${err}" PARENT_SCOPE)
endfunction()

function(sdk_expect_contains step text part)
  string(FIND "${text}" "${part}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${step}: expected the output to contain '${part}', got:\n${text}")
  endif()
endfunction()
