# The demo model (demo/model, trained by tools/train_demo.py) and the VQA harness
# (tools/eval_vqa.py). See tests/demo_model.py for what each test checks.
set(MM_DEMO_MODEL ${CMAKE_SOURCE_DIR}/demo/model)
set(MM_DEMO_CASES ${CMAKE_SOURCE_DIR}/demo/cases)
set(MM_DEMO_PY ${CMAKE_CURRENT_SOURCE_DIR}/e2e/demo_model.py)

if(EXISTS ${MM_DEMO_MODEL}/config.json)
  add_test(NAME demo_model_trainfwd COMMAND ${MM_PYTHON} ${MM_DEMO_PY} trainfwd ${MM_DEMO_MODEL} ${MM_DEMO_CASES})
  set_tests_properties(demo_model_trainfwd PROPERTIES TIMEOUT 60 LABELS "model;demo")
  if(TARGET medmoe-run)
    add_test(NAME demo_model_cases
             COMMAND ${MM_PYTHON} ${MM_DEMO_PY} cases $<TARGET_FILE:medmoe-run> ${MM_DEMO_MODEL} ${MM_DEMO_CASES})
    add_test(NAME demo_model_oracle
             COMMAND ${MM_PYTHON} ${MM_DEMO_PY} oracle $<TARGET_FILE:medmoe-run> ${MM_DEMO_MODEL}
                     ${MM_DEMO_CASES} ${MM_TEST_DATA}/demo/oracle)
    add_test(NAME demo_eval_formats
             COMMAND ${MM_PYTHON} ${MM_DEMO_PY} formats $<TARGET_FILE:medmoe-run> ${MM_DEMO_MODEL}
                     ${MM_DEMO_CASES} ${MM_TEST_DATA}/demo/formats)
    add_test(NAME demo_eval_heldout
             COMMAND ${MM_PYTHON} ${MM_DEMO_PY} heldout $<TARGET_FILE:medmoe-run> ${MM_DEMO_MODEL}
                     ${MM_TEST_DATA}/demo/heldout)
    set_tests_properties(demo_model_cases demo_model_oracle demo_eval_formats demo_eval_heldout
                         PROPERTIES TIMEOUT 120 LABELS "model;demo")
  endif()
endif()
