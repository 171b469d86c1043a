cmake_policy(SET CMP0007 NEW)
# cmake -P expect_diagnostics.cmake, with
#   -DCOMPILER=<c++ compiler> -DINCLUDE=<runnel's include dir>
#   -DSOURCE=<file> -DDEFINE="<macro> <macro> ..."
#   -DEXPECT=<regex>@@<regex>@@...  each must match its own line of the output
#   -DREJECT=<regex>                no line may match (optional)
# Compiles SOURCE (-fsyntax-only, -Werror) and fails unless the compile fails
# and every EXPECT regex matches a line, so one compile checks many
# diagnostics, each on its own.
separate_arguments(macros UNIX_COMMAND "${DEFINE}")
list(TRANSFORM macros PREPEND -D)
execute_process(
  COMMAND ${COMPILER} -std=c++20 -fsyntax-only -Wall -Wextra -Wpedantic -Werror -I${INCLUDE}
          ${macros} ${SOURCE}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(APPEND out "${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the compile succeeded; it must fail\n${out}")
endif()
# One list element a line (';' in the output would split lines further).
string(REPLACE ";" "," lines "${out}")
string(REPLACE "\n" ";" lines "${lines}")
set(all_lines "${lines}")
string(REPLACE "@@" ";" expect "${EXPECT}")
set(missing "")
foreach(re IN LISTS expect)
  set(found -1)
  set(i 0)
  foreach(line IN LISTS lines)
    if(line MATCHES "${re}")
      set(found ${i})
      break()
    endif()
    math(EXPR i "${i} + 1")
  endforeach()
  # A matched line is used up: the same regex twice needs two lines.
  if(found GREATER_EQUAL 0)
    list(REMOVE_AT lines ${found})
  else()
    list(APPEND missing "${re}")
  endif()
endforeach()
if(missing)
  string(REPLACE ";" "\n  " missing "${missing}")
  message(FATAL_ERROR "missing diagnostics:\n  ${missing}\n--- compiler output ---\n${out}")
endif()
if(REJECT)
  foreach(line IN LISTS all_lines)
    if(line MATCHES "${REJECT}")
      message(FATAL_ERROR "unwanted diagnostic: ${line}\n--- compiler output ---\n${out}")
    endif()
  endforeach()
endif()
list(LENGTH expect n)
message(STATUS "all ${n} expected diagnostics found")
