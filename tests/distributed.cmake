# Distributed serving (docs/ARCHITECTURE.md, "Router ↔ expert wire"): black-box tests of
# medmoe-router + medmoe-expert as real processes on 127.0.0.1 (ephemeral ports,
# --endpoint-file), compared with medmoe-run on the same tiny checkpoint. The fault scenarios
# (kill, freeze, rogue, curve, silent, failing) send concurrent cases through the gRPC front door,
# the others --cases JSON lines. Driver: tests/distributed/dist_test.py
# (one scenario per ctest; every process killed at the end; every wait is for an event — a log
# line, a file, an answer — and bounded).
# Registered only once both programs exist, so the tree builds while they are missing.
if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe-run)
  set(MM_DIST_DRIVER ${CMAKE_CURRENT_SOURCE_DIR}/distributed/dist_test.py)
  set(MM_DIST_KEYGEN "")
  if(TARGET medmoe-keygen)
    set(MM_DIST_KEYGEN --keygen $<TARGET_FILE:medmoe-keygen>)
  endif()

  # name | checkpoint | scenario | timeout (s)
  set(MM_DIST_TESTS
      "equiv_stablelm-f32|stablelm-f32|equiv|90"
      "equiv_phi-f32|phi-f32|equiv|90"
      "equiv_stablelm-bf16|stablelm-bf16|equiv|90"
      "replicas|stablelm-f32|replicas|90"
      "kill|stablelm-f32|kill|120"
      "freeze|stablelm-f32|freeze|120"
      "unavailable|stablelm-f32|unavailable|90"
      "fingerprint|stablelm-f32|fingerprint|60"
      "garbage|stablelm-f32|garbage|120"
      "rogue|stablelm-f32|rogue|90"
      "cli|stablelm-f32|cli|60"
      "silent|stablelm-f32|silent|180"
      "failing|stablelm-f32|failing|180"
      "expired|stablelm-f32|expired|60")
  if(TARGET medmoe-keygen)
    list(APPEND MM_DIST_TESTS "curve|stablelm-f32|curve|90")
  endif()

  foreach(spec ${MM_DIST_TESTS})
    string(REPLACE "|" ";" spec "${spec}")
    list(GET spec 0 name)
    list(GET spec 1 ckpt)
    list(GET spec 2 scenario)
    list(GET spec 3 timeout)
    add_test(NAME dist_${name}
             COMMAND ${MM_PYTHON} ${MM_DIST_DRIVER} --scenario ${scenario}
                     --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                     --run $<TARGET_FILE:medmoe-run> ${MM_DIST_KEYGEN}
                     --model ${MM_TEST_DATA}/tiny-${ckpt} --image ${MM_TEST_DATA}/images/case.png
                     --workdir ${MM_TEST_DATA}/dist/${name}
                     --maker ${CMAKE_SOURCE_DIR}/tools/make_tiny_checkpoint.py)
    set_tests_properties(dist_${name} PROPERTIES
                         FIXTURES_REQUIRED "tiny_${ckpt};tiny_images"
                         TIMEOUT ${timeout} LABELS "distributed")
  endforeach()

  # Hostile peers on the expert socket (tests/distributed/hostile_test.py): intruders with the
  # right fingerprint but no / an unknown CurveZMQ key never join (16 cases exact); a Hello flood
  # and 512 MiB frames on a plaintext router, router RSS before / peak / after and log bytes held
  # under the limits the driver states.
  foreach(spec "intruder|90" "hello_flood|120" "big_frame|90")
    string(REPLACE "|" ";" spec "${spec}")
    list(GET spec 0 name)
    list(GET spec 1 timeout)
    add_test(NAME dist_hostile_${name}
             COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/distributed/hostile_test.py
                     --scenario ${name}
                     --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                     --run $<TARGET_FILE:medmoe-run> --model ${MM_TEST_DATA}/tiny-stablelm-f32
                     --image ${MM_TEST_DATA}/images/case.png
                     --workdir ${MM_TEST_DATA}/dist/hostile_${name})
    set_tests_properties(dist_hostile_${name} PROPERTIES
                         FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images"
                         TIMEOUT ${timeout} LABELS "distributed")
  endforeach()

  # The engine thread busy outside any MoE layer for 10 heartbeat intervals (on vulkan the
  # vision tower runs in the step; --debug-vision-delay-ms): no expert hears silence, none
  # reconnects or is dropped, the answer equals medmoe-run's. Exit 77 without a Vulkan device.
  # Driver: tests/distributed/dist_busy_engine.py
  if(MEDMOE_VULKAN)
    add_test(NAME dist_busy_engine
             COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/distributed/dist_busy_engine.py
                     --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                     --run $<TARGET_FILE:medmoe-run> --backend vulkan
                     --model ${MM_TEST_DATA}/tiny-stablelm-f32
                     --image ${MM_TEST_DATA}/images/case.png
                     --workdir ${MM_TEST_DATA}/dist/busy_engine)
    set_tests_properties(dist_busy_engine PROPERTIES
                         FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images"
                         SKIP_RETURN_CODE 77 TIMEOUT 120 LABELS "distributed;vulkan")
  endif()
endif()

# The dispatch thread against fake experts in one process (real ZeroMQ on loopback): a busy
# engine keeps heartbeats going, hedging past a silent replica, quarantine that survives a
# Hello again, error answers re-sent at once, EXPIRED, Work.deadline_ms, exact in-flight counts.
if(TARGET mm_dispatch)
  add_executable(test_dispatch ${CMAKE_CURRENT_SOURCE_DIR}/distributed/test_dispatch.c)
  target_link_libraries(test_dispatch PRIVATE mm_dispatch)
  add_test(NAME dist_dispatch_unit COMMAND test_dispatch)
  set_tests_properties(dist_dispatch_unit PROPERTIES TIMEOUT 120 LABELS "distributed")
endif()
