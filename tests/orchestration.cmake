# Orchestration (docs/ARCHITECTURE.md, "Orchestration"): orchestration/medmoe-cluster (local
# launcher + supervisor), the Kubernetes manifests, and multi-host serving across network
# namespaces. Drivers in
# tests/orchestration/ (each bounds every wait and stops every process it started):
#   orch_cluster    up (CurveZMQ keys made and used) -> status -> a case over gRPC (= medmoe-run)
#                   -> kill -9 an expert -> supervisor restarts it -> kill -9 the router -> back on
#                   the same ports, the same client answered -> scale 1 -> 2 -> 1 under load (no
#                   case fails) -> down
#   orch_manifests  `kubectl kustomize` + structural checks of orchestration/kubernetes, the
#                   Dockerfile and cluster.example.json; flags checked against the programs' --help
#   orch_devices    per-process Vulkan devices (vk_device keys -> --vk-device per router / expert
#                   replica), bad specs refused, a bad selector makes medmoe-expert exit listing devices
#   orch_netns      router / experts in three network namespaces joined by veth pairs, cases
#                   equal to medmoe-run (root only: skipped with 77 without CAP_NET_ADMIN)
set(MM_ORCH_DIR ${CMAKE_CURRENT_SOURCE_DIR}/orchestration)
set(MM_ORCH_CLUSTER ${CMAKE_SOURCE_DIR}/orchestration/medmoe-cluster)

set(MM_ORCH_BINS "")
if(TARGET medmoe-router AND TARGET medmoe-expert)
  set(MM_ORCH_BINS --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>)
endif()
add_test(NAME orch_manifests COMMAND ${MM_PYTHON} ${MM_ORCH_DIR}/manifests_test.py ${MM_ORCH_BINS})
set_tests_properties(orch_manifests PROPERTIES TIMEOUT 60 LABELS "orchestration")
add_test(NAME orch_devices COMMAND ${MM_PYTHON} ${MM_ORCH_DIR}/devices_test.py --cluster ${MM_ORCH_CLUSTER}
                                   ${MM_ORCH_BINS})
set_tests_properties(orch_devices PROPERTIES TIMEOUT 60 LABELS "orchestration;vulkan")

if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe-run)
  set(MM_ORCH_COMMON --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                     --run $<TARGET_FILE:medmoe-run> --model ${MM_TEST_DATA}/tiny-stablelm-f32
                     --image ${MM_TEST_DATA}/images/case.png)
  add_test(NAME orch_cluster
           COMMAND ${MM_PYTHON} ${MM_ORCH_DIR}/cluster_test.py --cluster ${MM_ORCH_CLUSTER}
                   ${MM_ORCH_COMMON} --keygen $<TARGET_FILE:medmoe-keygen>
                   --workdir ${MM_TEST_DATA}/orch/cluster)
  add_test(NAME orch_netns
           COMMAND ${MM_PYTHON} ${MM_ORCH_DIR}/netns_test.py ${MM_ORCH_COMMON}
                   --workdir ${MM_TEST_DATA}/orch/netns)
  set_tests_properties(orch_cluster PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77
                       FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images" LABELS "orchestration")
  set_tests_properties(orch_netns PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77
                       FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images" LABELS "orchestration")
endif()
