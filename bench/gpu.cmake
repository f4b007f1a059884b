# bench/gpu.cmake — vk_bench (bench/gpu/vk_bench.c): the model's real shapes on the vulkan
# backend, checked against cpu and timed. Driven by bench/gpu/run on a GPU machine (device and
# memory report, build, kernel tests, vk_bench, medmoe-run vulkan vs cpu on a 4-layer
# full-width checkpoint); ctest bench_gpu_small runs `bench/gpu/run --small` on lavapipe.
if(MEDMOE_VULKAN)
  add_executable(vk_bench ${CMAKE_CURRENT_SOURCE_DIR}/gpu/vk_bench.c)
  target_link_libraries(vk_bench PRIVATE mm_kernels m)
endif()
