# bench/pacs.cmake — the PACS bridge: medmoe-pacs pull's end-to-end time per study against a
# real Orthanc, beside a direct gRPC ask of the same image (C CLI and Python client) in the
# same run (bench/pacs/bench_pacs.py). Prints, never fails.
if(TARGET medmoe-pacs AND TARGET medmoe AND TARGET medmoe-router AND TARGET medmoe-expert)
  list(APPEND MM_BENCH_COMMANDS
       "/usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/pacs/bench_pacs.py --pacs $<TARGET_FILE:medmoe-pacs> --cli $<TARGET_FILE:medmoe> --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert> --model ${CMAKE_SOURCE_DIR}/demo/model --workdir ${CMAKE_BINARY_DIR}/bench-pacs")
endif()
