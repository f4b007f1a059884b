# run_errors: black-box bad-input tests of medmoe-run (tests/run_errors.py). Broken
# copies of the tiny StableLM checkpoint (truncated / inconsistent safetensors, missing
# or mis-shaped tensors, unknown dtype, bad config.json), corrupt / empty / enormous
# images, empty question, bad options: each must exit 1 or 2 with a message naming the
# file, tensor or field, never crash, and (in the sanitizer build) never leak.
if(TARGET medmoe-run)
  add_test(NAME run_errors
           COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/run_errors.py
                   --run $<TARGET_FILE:medmoe-run>
                   --model ${MM_TEST_DATA}/tiny-stablelm-f32
                   --images ${MM_TEST_DATA}/images
                   --work ${MM_TEST_DATA}/run-errors)
  set_tests_properties(run_errors PROPERTIES
                       FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images"
                       LABELS "model;errors" TIMEOUT 120)
endif()
