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
