# tests/kernels.cmake — the per-op kernel tests, one program run once per
# backend. Exit 77 means "backend not available here" (SKIP); with
# MEDMOE_REQUIRE_VULKAN=1 in the environment a missing Vulkan device fails.
add_executable(test_kernels ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_kernels.c)
target_link_libraries(test_kernels PRIVATE mm_kernels m)

add_test(NAME kernels_cpu COMMAND test_kernels cpu)
set_tests_properties(kernels_cpu PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300 LABELS "kernels")

add_test(NAME kernels_vulkan COMMAND test_kernels vulkan)
set_tests_properties(kernels_vulkan PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600
                     LABELS "kernels;vulkan")

# The cpu backend's other kernel paths, forced (kernels/cpu/cpu_matmul.h):
# CI machines with AVX-512 still test the AVX2 and portable C fallbacks. A
# path this CPU cannot run skips (77).
foreach(isa avx512 avx2 c)
  add_test(NAME kernels_cpu_${isa} COMMAND test_kernels cpu)
  set_tests_properties(kernels_cpu_${isa} PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300
                       LABELS "kernels" ENVIRONMENT "MEDMOE_CPU_ISA=${isa}")
endforeach()

# The cpu backend's thread pool: every task once, concurrent callers, and
# idle workers that sleep.
add_executable(test_cpu_pool ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_cpu_pool.c)
target_link_libraries(test_cpu_pool PRIVATE mm_kernels PkgConfig::CMOCKA Threads::Threads)
add_test(NAME cpu_pool COMMAND test_cpu_pool)
set_tests_properties(cpu_pool PROPERTIES TIMEOUT 120 LABELS "kernels")

# Weights used in place from the mapped checkpoint and shared between two
# processes (RSS vs PSS of the mapping; no private-dirty page; no copy).
add_executable(test_shared_weights ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_shared_weights.c)
target_link_libraries(test_shared_weights PRIVATE mm_model)
add_test(NAME shared_weights COMMAND test_shared_weights ${MM_TEST_DATA}/tiny-stablelm-bf16)
set_tests_properties(shared_weights PROPERTIES FIXTURES_REQUIRED "tiny_stablelm-bf16"
                     TIMEOUT 120 LABELS "kernels;model")

# The optional oneDNN bf16 prefill (kernels/cpu/cpu_dnnl.h): the same kernel
# tests, with the tolerance of bf16-rounded activations on its calls.
add_test(NAME kernels_cpu_prefill_bf16 COMMAND test_kernels cpu)
set_tests_properties(kernels_cpu_prefill_bf16 PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300
                     LABELS "kernels" ENVIRONMENT "MEDMOE_CPU_PREFILL=bf16")
