# The gRPC front door (docs/ARCHITECTURE.md, "The gRPC front door"): black-box tests of
# medmoe-router --grpc-listen with real medmoe-expert processes on 127.0.0.1 (ephemeral ports),
# through the three clients: the C CLI `medmoe`, clients/python (python3-grpcio, stubs
# generated into the build tree) and clients/node (@grpc/grpc-js, `npm ci` into the build tree
# by the grpc_node_deps fixture).
# Answers are compared with medmoe-run --json on the same case. Driver:
# tests/grpc/grpc_test.py (one scenario per ctest; every process killed at the end, every
# wait bounded). Registered only once the programs exist, so the tree builds without them.
if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe AND TARGET medmoe-run)
  set(MM_GRPC_DRIVER ${CMAKE_CURRENT_SOURCE_DIR}/grpc/grpc_test.py)
  set(MM_GRPC_NODE_MODULES ${CMAKE_BINARY_DIR}/clients/node-deps/node_modules)
  set(MM_GRPC_KEYGEN "")
  if(TARGET medmoe-keygen)
    set(MM_GRPC_KEYGEN --keygen $<TARGET_FILE:medmoe-keygen>)
  endif()
  find_program(MM_NPM npm)
  find_program(MM_NODE node)

  set(MM_GRPC_NODE_FIXTURE "")
  if(MM_NPM AND MM_NODE)
    add_test(NAME grpc_node_deps
             COMMAND ${MM_PYTHON} ${MM_GRPC_DRIVER} --scenario node_deps
                     --node-modules ${MM_GRPC_NODE_MODULES})
    set_tests_properties(grpc_node_deps PROPERTIES FIXTURES_SETUP grpc_node_deps
                         TIMEOUT 300 LABELS "grpc")
    set(MM_GRPC_NODE_FIXTURE grpc_node_deps)
  endif()

  # name | timeout (s) | extra fixtures (the Node client is checked where its modules are)
  # | driver (default grpc_test.py; hostile_test.py: floods and stalled readers, the router's
  # RSS measured before, at the peak and after, each held under a limit stated in that file)
  set(MM_GRPC_TESTS
      "flood|300||hostile_test.py"
      "stalled_reader|120||hostile_test.py"
      "python|60|"
      "cli|60|"
      "status_auth|90|"
      "status_invalid|60|"
      "strict|90|${MM_GRPC_NODE_FIXTURE}"
      "stream_contract|120|${MM_GRPC_NODE_FIXTURE}"
      "status_unavailable|60|"
      "status_deadline|90|"
      "tenants|120|"
      "stream32|120|"
      "cancel|90|"
      "tls|120|${MM_GRPC_NODE_FIXTURE}"
      "audit|60|"
      "audit_crash|90|"
      "robust|120|"
      "slow_image|120|"
      "slow_image_30s|180|"
      "one_engine|120|")
  if(MM_GRPC_NODE_FIXTURE)
    list(APPEND MM_GRPC_TESTS "node|60|grpc_node_deps")
  endif()
  foreach(spec ${MM_GRPC_TESTS})
    string(REPLACE "|" ";" spec "${spec}")
    list(GET spec 0 name)
    list(GET spec 1 timeout)
    list(LENGTH spec n)
    set(extra "")
    set(driver ${MM_GRPC_DRIVER})
    if(n GREATER 2)
      list(GET spec 2 extra)
    endif()
    if(n GREATER 3)
      list(GET spec 3 driver)
      set(driver ${CMAKE_CURRENT_SOURCE_DIR}/grpc/${driver})
    endif()
    add_test(NAME grpc_${name}
             COMMAND ${MM_PYTHON} ${driver} --scenario ${name}
                     --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                     --run $<TARGET_FILE:medmoe-run> --cli $<TARGET_FILE:medmoe> ${MM_GRPC_KEYGEN}
                     --model ${MM_TEST_DATA}/tiny-stablelm-f32
                     --image ${MM_TEST_DATA}/images/case.png
                     --workdir ${MM_TEST_DATA}/grpc/${name}
                     --node-modules ${MM_GRPC_NODE_MODULES})
    set_tests_properties(grpc_${name} PROPERTIES
                         FIXTURES_REQUIRED "tiny_stablelm-f32;tiny_images;${extra}"
                         TIMEOUT ${timeout} LABELS "grpc")
  endforeach()
endif()
