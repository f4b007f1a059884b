# ctest `checkpoint`: safetensors files and directories (valid, sharded,
# malformed, fuzzed), config.json of both backbones and CLIP, fingerprints.
# Test files are written at run time under ${MM_TEST_DATA}/checkpoint.
add_executable(test_checkpoint ${CMAKE_CURRENT_LIST_DIR}/unit/test_checkpoint.c)
target_link_libraries(test_checkpoint PRIVATE mm_model)
add_test(NAME checkpoint COMMAND test_checkpoint ${MM_TEST_DATA}/checkpoint)
set_tests_properties(checkpoint PROPERTIES TIMEOUT 120)

# checkpoint_tiny: the C reader against an independent Python parse of the tiny
# checkpoints tools/make_tiny_checkpoint.py writes (real HF layout, sharded).
add_test(NAME checkpoint_tiny
         COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/data/checkpoint_crosscheck.py
                 $<TARGET_FILE:test_checkpoint> ${CMAKE_SOURCE_DIR}/tools ${MM_TEST_DATA}/checkpoint_tiny)
set_tests_properties(checkpoint_tiny PROPERTIES TIMEOUT 300)
