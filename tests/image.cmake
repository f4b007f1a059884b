# tests/image.cmake — image decoding + CLIP preprocessing (model/image.c)
# against the PIL/numpy reference (tests/reference/image_ref.py), plus broken
# and hostile inputs. image_data generates the images and reference outputs
# at test time; `image` needs it (ctest fixture, so `ctest -R image` works).
add_executable(test_image ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_image.c)
target_link_libraries(test_image PRIVATE mm_model PkgConfig::CMOCKA m)

set(MM_IMAGE_TEST_DATA ${MM_TEST_DATA}/image)
add_test(NAME image_data
         COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/reference/image_ref.py gen
                 ${MM_IMAGE_TEST_DATA})
set_tests_properties(image_data PROPERTIES FIXTURES_SETUP image_data TIMEOUT 120
                     LABELS "image")

add_test(NAME image COMMAND test_image ${MM_IMAGE_TEST_DATA})
set_tests_properties(image PROPERTIES FIXTURES_REQUIRED image_data TIMEOUT 300 LABELS "image")
