# tests/fuzz.cmake — the libFuzzer targets (tests/fuzz/) in the normal
# test run. They need clang (libFuzzer is part of it), so they cannot be
# built by this (gcc) build: fuzz_build configures and builds a separate
# clang build in <build>/fuzz (-DMEDMOE_FUZZ=ON: ASan + UBSan + coverage),
# and each fuzz_<target> then runs that target for MM_FUZZ_SECONDS (20) from
# its committed seed corpus tests/fuzz/corpus/<target>/ (which holds the
# reproducer of every crash found so far). A crash, a leak, a UBSan report,
# an assertion in the harness or a 30 s hang fails the test; the input is
# kept as <build>/fuzz/artifacts/<target>-crash-<sha1>. Long campaigns:
# tests/fuzz/README.md.
set(MM_FUZZ_SECONDS 20 CACHE STRING "seconds each fuzz target runs in ctest")
set(MM_FUZZ_TARGETS safetensors config tokenizer_json tiktoken image wire case_request)
set(MM_FUZZ_DIR ${CMAKE_BINARY_DIR}/fuzz)
find_program(MM_CLANG NAMES clang clang-14)
find_program(MM_CLANGXX NAMES clang++ clang++-14) # for the project's C++ sources, if any
if(MM_CLANG AND MM_CLANGXX)
  add_test(NAME fuzz_build
           COMMAND sh -c "${CMAKE_COMMAND} -S ${CMAKE_SOURCE_DIR} -B ${MM_FUZZ_DIR} \
-DCMAKE_C_COMPILER=${MM_CLANG} -DCMAKE_CXX_COMPILER=${MM_CLANGXX} -DMEDMOE_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo > \
${MM_FUZZ_DIR}.configure.log 2>&1 || { cat ${MM_FUZZ_DIR}.configure.log; exit 1; }; \
${CMAKE_COMMAND} --build ${MM_FUZZ_DIR} -j 2 --target fuzzers")
else()
  add_test(NAME fuzz_build
           COMMAND sh -c "echo 'clang not found: install clang libclang-rt-14-dev libomp-dev (make deps)'; exit 1")
endif()
set_tests_properties(fuzz_build PROPERTIES FIXTURES_SETUP fuzz_build TIMEOUT 900 LABELS "fuzz")

foreach(t ${MM_FUZZ_TARGETS})
  set(_work ${MM_FUZZ_DIR}/work/${t})
  add_test(NAME fuzz_${t}
           COMMAND sh -c "rm -rf ${_work} && mkdir -p ${_work} ${MM_FUZZ_DIR}/artifacts && \
exec ${MM_FUZZ_DIR}/tests/fuzz/fuzz_${t} -max_total_time=${MM_FUZZ_SECONDS} -timeout=30 \
-rss_limit_mb=2560 -print_final_stats=1 -artifact_prefix=${MM_FUZZ_DIR}/artifacts/${t}- \
${_work} ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus/${t}")
  set_tests_properties(fuzz_${t} PROPERTIES FIXTURES_REQUIRED fuzz_build TIMEOUT 180
                       LABELS "fuzz")
endforeach()
