# bench/grpc.cmake — the gRPC front door: cases/s and p50/p99 latency for 1, 8, 32
# concurrent clients against medmoe-router + 4 medmoe-expert on loopback, beside medmoe-run's
# time for the same case in the same run (the front door's overhead). Prints, never fails.
if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe-run)
  set(_cli "")
  if(TARGET medmoe)
    set(_cli "--cli $<TARGET_FILE:medmoe>")
  endif()
  list(APPEND MM_BENCH_COMMANDS
       "/usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/grpc/bench_grpc.py --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert> --run $<TARGET_FILE:medmoe-run> ${_cli} --workdir ${CMAKE_BINARY_DIR}/bench-grpc")
endif()
