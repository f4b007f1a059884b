# tests/image_dicom.cmake — DICOM decoding (model/dicom.c) against pydicom's own display
# pipeline (apply_modality_lut, apply_voi_lut, convert_color_space,
# apply_color_lut) on pydicom's test files and on files generated at test
# time for what those lack (tests/dicom/oracle.py says which).
add_executable(mm-dicom-dump ${CMAKE_CURRENT_SOURCE_DIR}/dicom/dicom_dump.c)
target_link_libraries(mm-dicom-dump PRIVATE mm_model)

add_test(NAME dicom_oracle
         COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/dicom/oracle.py
                 $<TARGET_FILE:mm-dicom-dump> ${MM_TEST_DATA}/dicom)
set_tests_properties(dicom_oracle PROPERTIES TIMEOUT 300 LABELS "image;dicom")

# (Named to sort after grpc.cmake, whose Node fixture dicom_grpc uses.)
# application/dicom through the gRPC front door (tests/dicom/grpc_dicom_test.py): equal answers
# to medmoe-run, the window and frame options travel, refusals name the field, no patient
# attribute in any log or audit line.
if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe AND TARGET medmoe-run)
  add_test(NAME dicom_grpc
           COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/dicom/grpc_dicom_test.py
                   --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert>
                   --run $<TARGET_FILE:medmoe-run> --cli $<TARGET_FILE:medmoe>
                   --model ${MM_TEST_DATA}/tiny-stablelm-f32
                   --image ${MM_TEST_DATA}/images/case.png
                   --workdir ${MM_TEST_DATA}/grpc/dicom
                   --node-modules ${CMAKE_BINARY_DIR}/clients/node-deps/node_modules)
  # the Node client is checked where grpc.cmake's npm fixture exists
  set(_mm_dicom_fixtures "tiny_stablelm-f32;tiny_images")
  if(TEST grpc_node_deps)
    list(APPEND _mm_dicom_fixtures grpc_node_deps)
  endif()
  set_tests_properties(dicom_grpc PROPERTIES FIXTURES_REQUIRED "${_mm_dicom_fixtures}"
                       TIMEOUT 180 LABELS "grpc;dicom")
endif()

# Hostile files found by fuzzing (tests/dicom/regress/): each is refused with a message, never a
# crash. meta-only.dcm: a File Meta Information group and nothing after it (GDCM 3.0.21 asserts).
add_test(NAME dicom_regress_meta_only
         COMMAND $<TARGET_FILE:mm-dicom-dump> ${CMAKE_CURRENT_SOURCE_DIR}/dicom/regress/meta-only.dcm)
set_tests_properties(dicom_regress_meta_only PROPERTIES TIMEOUT 60 LABELS "image;dicom"
                     PASS_REGULAR_EXPRESSION "no data set after the File Meta Information")
