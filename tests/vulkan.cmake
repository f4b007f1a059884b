# tests/vulkan.cmake — the Vulkan backend's own self-test (kernels/vulkan/
# vk_selftest.c): submission splitting, hazards, views at odd offsets, long
# attention, device selection; each checked against the cpu backend.
# Exit 77 = no Vulkan device (SKIP) unless MEDMOE_REQUIRE_VULKAN=1.
if(MEDMOE_VULKAN)
  add_executable(vk_selftest ${CMAKE_SOURCE_DIR}/kernels/vulkan/vk_selftest.c)
  target_link_libraries(vk_selftest PRIVATE mm_kernels m)
  add_test(NAME vulkan_selftest COMMAND vk_selftest)
  set_tests_properties(vulkan_selftest PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300
                       LABELS "kernels;vulkan")

  # Under MEDMOE_SANITIZE, tests/CMakeLists.txt preloads lavapipe for every test
  # (its one-time init leaks 128 bytes from a module that would be unloaded).
endif()
# The same checks with tensors in non-mapped memory and every upload, readback
# and zeroing done by GPU copies and fills through the staging buffer: the
# placement discrete GPUs get, forced here on lavapipe (kernels/vulkan/vk_memory.c);
# and with subgroups off, so the shared-memory reductions run too (lavapipe has
# subgroup arithmetic, so the plain runs take the subgroup shaders).
if(TARGET vk_selftest)
  add_test(NAME vulkan_selftest_staging COMMAND vk_selftest)
  set_tests_properties(vulkan_selftest_staging PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300
                       ENVIRONMENT "MEDMOE_VK_MEMORY=staging;MEDMOE_VK_SUBGROUPS=0" LABELS "kernels;vulkan")
  add_test(NAME kernels_vulkan_staging COMMAND test_kernels vulkan)
  set_tests_properties(kernels_vulkan_staging PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600
                       ENVIRONMENT "MEDMOE_VK_MEMORY=staging;MEDMOE_VK_SUBGROUPS=0" LABELS "kernels;vulkan")
endif()

# bench/gpu/run in its CI form: device report, self-test (with and without subgroups),
# vk_bench --small (the model's shape kinds at small sizes, vulkan vs cpu) and medmoe-run
# vulkan vs cpu on a tiny checkpoint. The full run (real shapes, a 4-layer full-width
# checkpoint, timings) is for a GPU machine: `bench/gpu/run`.
if(MEDMOE_VULKAN AND TARGET medmoe-run)  # vk_bench: bench/gpu.cmake (added after tests/)
  add_test(NAME bench_gpu_small
           COMMAND bash ${CMAKE_SOURCE_DIR}/bench/gpu/run --small --build-dir ${CMAKE_BINARY_DIR}
                   --model ${MM_TEST_DATA}/tiny-stablelm-bf16 --data ${MM_TEST_DATA}/bench-gpu)
  set_tests_properties(bench_gpu_small PROPERTIES TIMEOUT 600 SKIP_RETURN_CODE 77
                       FIXTURES_REQUIRED "tiny_stablelm-bf16" LABELS "kernels;vulkan;bench")
endif()
