# The PACS bridge (docs/PACS.md): medmoe-pacs against a real Orthanc (Debian orthanc +
# orthanc-dicomweb, started by the test on 127.0.0.1, free ports, its own storage) and the
# real router + 4 experts on the demo model. Driver: tests/pacs/pacs_test.py (its top says
# what each scenario checks). Skips (77) only when Orthanc or its DICOMweb plugin is missing.
# The image goes as the DICOM instance itself (--send dicom) once the router decodes DICOM
# (model/dicom.h is in the tree), else as Orthanc's rendered PNG; pacs_pull_rendered checks
# the rendered path either way.
if(TARGET medmoe-pacs AND TARGET medmoe-router AND TARGET medmoe-expert
   AND EXISTS ${CMAKE_SOURCE_DIR}/demo/model/config.json)
  if(EXISTS ${CMAKE_SOURCE_DIR}/model/dicom.h)
    set(MM_PACS_SEND dicom)
  else()
    set(MM_PACS_SEND rendered)
  endif()
  foreach(spec "pull|${MM_PACS_SEND}" "watch|${MM_PACS_SEND}" "hostile|${MM_PACS_SEND}"
          "pull_rendered|rendered")
    string(REPLACE "|" ";" spec "${spec}")
    list(GET spec 0 name)
    list(GET spec 1 send)
    string(REPLACE "_rendered" "" scenario ${name})
    add_test(NAME pacs_${name}
             COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/pacs/pacs_test.py --scenario ${scenario}
                     --pacs $<TARGET_FILE:medmoe-pacs> --router $<TARGET_FILE:medmoe-router>
                     --expert $<TARGET_FILE:medmoe-expert> --model ${CMAKE_SOURCE_DIR}/demo/model
                     --workdir ${MM_TEST_DATA}/pacs/${name} --send ${send})
    set_tests_properties(pacs_${name} PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 240 LABELS "pacs")
  endforeach()
endif()

# pacs_sr: the SR writer and the UID maker alone (tests/unit/test_pacs_sr.c), no processes.
if(TARGET mm_pacs)
  add_executable(test_pacs_sr ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_pacs_sr.c)
  target_link_libraries(test_pacs_sr PRIVATE mm_pacs PkgConfig::CMOCKA)
  add_test(NAME pacs_sr COMMAND test_pacs_sr)
  set_tests_properties(pacs_sr PROPERTIES TIMEOUT 30 LABELS "pacs")
endif()
