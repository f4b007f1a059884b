# tests/tokenizer.cmake — the byte-level BPE tokenizer (model/tokenizer.c,
# model/prompt.c) against the pure-Python reference tests/reference/bpe_ref.py.
#   tokenizer_setup  make both flavors of test tokenizer into MM_TEST_DATA (fixture)
#   tokenizer        C vs Python ids on tests/data/tokenizer_corpus.txt, round
#                    trips, tiktoken == tokenizer.json, prompts, bad files
#   tokenizer_unit   streaming decode, errors, look-ups, templates (C only)
# The test program compiles the two sources itself, so a half-written file
# elsewhere in mm_model cannot stop these tests from building.
pkg_check_modules(MMTOK_PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
add_executable(test_tokenizer ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_tokenizer.c
               ${PROJECT_SOURCE_DIR}/model/tokenizer.c ${PROJECT_SOURCE_DIR}/engine/prompt.c)
target_include_directories(test_tokenizer PRIVATE ${PROJECT_SOURCE_DIR}/model ${PROJECT_SOURCE_DIR}/engine)
target_link_libraries(test_tokenizer PRIVATE mm_kernels PkgConfig::JANSSON PkgConfig::MMTOK_PCRE2)

set(MM_TOK_DIR ${MM_TEST_DATA}/tokenizer)
add_test(NAME tokenizer_setup
         COMMAND ${CMAKE_COMMAND} -E env
                 ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_tokenizer.py setup ${MM_TOK_DIR})
set_tests_properties(tokenizer_setup PROPERTIES FIXTURES_SETUP tokenizer_files TIMEOUT 120
                     LABELS "tokenizer")

add_test(NAME tokenizer
         COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_tokenizer.py check ${MM_TOK_DIR}
                 $<TARGET_FILE:test_tokenizer>)
set_tests_properties(tokenizer PROPERTIES FIXTURES_REQUIRED tokenizer_files TIMEOUT 300
                     LABELS "tokenizer")

add_test(NAME tokenizer_unit COMMAND test_tokenizer unit ${MM_TOK_DIR}/gpt2)
set_tests_properties(tokenizer_unit PROPERTIES FIXTURES_REQUIRED tokenizer_files TIMEOUT 120
                     LABELS "tokenizer")
