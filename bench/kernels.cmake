# bench/kernels.cmake — per-op kernel figures (matmul, GEMV bandwidth,
# attention) for every backend that can be created, beside plain OpenBLAS
# and memcpy measured in the same run.
add_executable(bench_kernels ${CMAKE_CURRENT_SOURCE_DIR}/bench_kernels.c)
target_link_libraries(bench_kernels PRIVATE mm_kernels m)
list(APPEND MM_BENCH_COMMANDS ${CMAKE_BINARY_DIR}/bench/bench_kernels)
