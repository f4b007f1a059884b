# common/ (metrics and logs; docs/ARCHITECTURE.md, "Observability"): the Prometheus registry +
# HTTP endpoint and the log module (test_metrics, cmocka, scrapes a real socket), and
# metrics_e2e: router + experts started with --metrics-listen 127.0.0.1:0, a case answered,
# both endpoints scraped.
if(TARGET mm_common)
  add_executable(test_metrics ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_metrics.c)
  target_link_libraries(test_metrics PRIVATE mm_common PkgConfig::CMOCKA)
  add_test(NAME metrics_unit COMMAND test_metrics)
  set_tests_properties(metrics_unit PROPERTIES TIMEOUT 60 LABELS "metrics")
endif()

if(TARGET medmoe-router AND TARGET medmoe-expert)
  foreach(scenario cases grpc)
    add_test(NAME metrics_e2e_${scenario}
             COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/metrics_e2e.py --scenario ${scenario}
                     --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                     --model ${MM_TEST_DATA}/tiny-stablelm-f32
                     --image ${MM_TEST_DATA}/images/case.png
                     --workdir ${MM_TEST_DATA}/metrics/${scenario})
    set_tests_properties(metrics_e2e_${scenario} PROPERTIES
                         FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images"
                         TIMEOUT 90 LABELS "metrics")
  endforeach()
endif()
