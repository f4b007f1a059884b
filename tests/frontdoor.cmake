# The front door's units, each a module's self-test: tenants (keys, quotas, refunds, config
# errors), request_check (NUL, UTF-8, case id length and control characters, wire walk) and
# audit (records, a torn last line, the scan for cases a dead run left unfinished).
if(TARGET mm_frontdoor)
  foreach(unit tenants request_check audit)
    add_executable(test_${unit} ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_${unit}.c)
    target_link_libraries(test_${unit} PRIVATE mm_frontdoor)
    add_test(NAME ${unit} COMMAND test_${unit})
    set_tests_properties(${unit} PROPERTIES TIMEOUT 60 LABELS "grpc")
  endforeach()
endif()
