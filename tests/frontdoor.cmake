# The front door's units: tenants (keys, quotas, config errors).
if(TARGET mm_frontdoor)
  add_executable(test_tenants ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_tenants.c)
  target_link_libraries(test_tenants PRIVATE mm_frontdoor)
  add_test(NAME tenants COMMAND test_tenants)
  set_tests_properties(tenants PROPERTIES TIMEOUT 60 LABELS "grpc")
endif()
