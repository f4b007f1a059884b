# Sampling (temperature / top-p / seed) through medmoe-run on a tiny checkpoint.
if(TARGET medmoe-run)
  add_test(NAME sampling
           COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/sampling.py $<TARGET_FILE:medmoe-run>
                   ${MM_TEST_DATA}/tiny-stablelm-f32 ${MM_TEST_DATA}/images/case.png)
  set_tests_properties(sampling PROPERTIES FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images"
                       TIMEOUT 300 LABELS "model")
endif()
