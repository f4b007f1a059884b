# tests/weights.cmake — int8 weights (medmoe-run --weights int8) against the weights as
# stored, in the same run: the demo model's held-out accuracy and routing, and greedy
# tokens on the test checkpoints. See tests/e2e/int8_quality.py for the bars.
if(TARGET medmoe-run)
  set(MM_INT8_PY ${CMAKE_CURRENT_SOURCE_DIR}/e2e/int8_quality.py)
  if(EXISTS ${CMAKE_SOURCE_DIR}/demo/model/config.json)
    add_test(NAME int8_quality_demo
             COMMAND ${MM_PYTHON} ${MM_INT8_PY} demo $<TARGET_FILE:medmoe-run>
                     ${CMAKE_SOURCE_DIR}/demo/model ${MM_TEST_DATA}/int8)
    set_tests_properties(int8_quality_demo PROPERTIES TIMEOUT 300 LABELS "model;demo")
  endif()
  set(_ck "")
  set(_fx "tiny_images")
  foreach(name stablelm-bf16 phi-bf16 stablelm-f32 phi-f32 stablelm-f32-top2
               stablelm-f32-residual)
    list(APPEND _ck ${MM_TEST_DATA}/tiny-${name})
    list(APPEND _fx tiny_${name})
  endforeach()
  add_test(NAME int8_quality_tokens
           COMMAND ${MM_PYTHON} ${MM_INT8_PY} tokens $<TARGET_FILE:medmoe-run> ${_ck})
  set_tests_properties(int8_quality_tokens PROPERTIES FIXTURES_REQUIRED "${_fx}" TIMEOUT 300
                       LABELS "model")
endif()
