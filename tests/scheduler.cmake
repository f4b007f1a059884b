# tests/scheduler.cmake — the continuous-batching scheduler (engine/scheduler.c):
# equivalence with the sequential oracle (tests/oracle) for many concurrent cases, streaming, tenant
# fairness, cancel, deadlines, bad requests, a failing forward step, shutdown.
# Runs on the tiny checkpoints of tests/model_equivalence.cmake.
# tests/oracle/ is the sequential reference the scheduler is checked against
# (one case at a time, prompt in one step); production code never links it.
add_library(mm_seq_oracle STATIC ${CMAKE_CURRENT_SOURCE_DIR}/oracle/seq_case.c
                                 ${CMAKE_CURRENT_SOURCE_DIR}/oracle/seq_generate.c)
target_include_directories(mm_seq_oracle PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/oracle)
target_link_libraries(mm_seq_oracle PUBLIC mm_engine m)
add_executable(test_scheduler ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_scheduler.c)
target_link_libraries(test_scheduler PRIVATE mm_seq_oracle m)

# -residual stops at EOS after 3 tokens; -top2 routes each row to 2 experts.
foreach(name stablelm-f32 phi-f32 stablelm-f32-residual stablelm-f32-top2)
  add_test(NAME scheduler_${name}
           COMMAND test_scheduler ${MM_TEST_DATA}/tiny-${name} ${MM_TEST_DATA}/images)
  set_tests_properties(scheduler_${name} PROPERTIES
                       FIXTURES_REQUIRED "tiny_${name};tiny_images"
                       LABELS "model;scheduler" TIMEOUT 300
                       # one thread: on a shared 2-core box, handing tiny ops
                       # to another thread costs more than the ops
                       ENVIRONMENT "MEDMOE_THREADS=1")
endforeach()

# The same on vulkan (lavapipe here): the vision tower runs on the engine
# thread there, and candidate scoring copies KV caches between slots on the
# device.
if(MEDMOE_VULKAN)
  add_test(NAME scheduler_stablelm-f32_vulkan
           COMMAND test_scheduler ${MM_TEST_DATA}/tiny-stablelm-f32 ${MM_TEST_DATA}/images)
  set_tests_properties(scheduler_stablelm-f32_vulkan PROPERTIES
                       FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images"
                       LABELS "model;scheduler;vulkan" TIMEOUT 600
                       ENVIRONMENT "MM_TEST_BACKEND=vulkan;MEDMOE_THREADS=1")
endif()
