# bench/distributed.cmake — distributed serving: decode tokens/s and time to first
# token for N = 1, 8, 32 cases with medmoe-router + 4 medmoe-expert on loopback beside
# medmoe-run on the same checkpoint in the same run, and the per-MoE-layer dispatch round trip
# beside a bare ZeroMQ DEALER/ROUTER round trip of the same bytes (bench_zmq_rtt).
pkg_check_modules(MM_BENCH_ZMQ QUIET IMPORTED_TARGET libzmq)
find_package(Threads)
if(MM_BENCH_ZMQ_FOUND AND Threads_FOUND)
  add_executable(bench_zmq_rtt ${CMAKE_CURRENT_SOURCE_DIR}/distributed/bench_zmq_rtt.c)
  target_link_libraries(bench_zmq_rtt PRIVATE PkgConfig::MM_BENCH_ZMQ Threads::Threads)
  list(APPEND MM_BENCH_COMMANDS "$<TARGET_FILE:bench_zmq_rtt> --width 64 --rows 1,16,135")
endif()
if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe-run)
  set(_rtt "")
  if(TARGET bench_zmq_rtt)
    set(_rtt "--rtt $<TARGET_FILE:bench_zmq_rtt>")
  endif()
  list(APPEND MM_BENCH_COMMANDS
       "/usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/distributed/bench_distributed.py --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert> --run $<TARGET_FILE:medmoe-run> ${_rtt} --workdir ${CMAKE_BINARY_DIR}/bench-distributed")
endif()
