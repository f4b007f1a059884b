# bench/kernels.cmake — per-op kernel figures (matmul, GEMV bandwidth,
# attention) for every backend that can be created, beside plain OpenBLAS
# and memcpy measured in the same run; and oneDNN's bf16 matmul beside
# OpenBLAS sgemm on the prefill and vision shapes, when libdnnl is installed.
add_executable(bench_kernels ${CMAKE_CURRENT_SOURCE_DIR}/bench_kernels.c)
target_link_libraries(bench_kernels PRIVATE mm_kernels m)
find_library(MM_DNNL_LIB dnnl)
find_path(MM_DNNL_INCLUDE oneapi/dnnl/dnnl.h)
if(MM_DNNL_LIB AND MM_DNNL_INCLUDE)
  target_compile_definitions(bench_kernels PRIVATE MM_HAVE_DNNL)
  target_link_libraries(bench_kernels PRIVATE ${MM_DNNL_LIB})
endif()
list(APPEND MM_BENCH_COMMANDS ${CMAKE_BINARY_DIR}/bench/bench_kernels)
