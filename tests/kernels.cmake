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
