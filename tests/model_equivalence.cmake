# Model equivalence: tiny random Med-MoE checkpoints in the real HF layout, goldens from the
# independent PyTorch oracle (tests/reference/medmoe_ref.py), and — once the engine exists —
# medmoe-run compared against them (tokens, routing, logits within 1e-3, candidate ranking).
#
# Fixtures (ctest FIXTURES_SETUP):
#   tiny_images            ${MM_TEST_DATA}/images/{case.png,case.jpg,gray.png}
#   tiny_<name>            ${MM_TEST_DATA}/tiny-<name>/ (+ clip/), by tools/make_tiny_checkpoint.py
#   golden_<name>          ${MM_TEST_DATA}/tiny-<name>/golden/{generate.json,generate.f32}
#                          (and classify.json for the checkpoints listed in MM_EQ_CLASSIFY)
# Other modules' tests may use these fixtures (FIXTURES_REQUIRED tiny_stablelm-f32 ...).

set(MM_EQ_REF ${CMAKE_CURRENT_SOURCE_DIR}/reference)
set(MM_EQ_MAKER ${CMAKE_SOURCE_DIR}/tools/make_tiny_checkpoint.py)
set(MM_EQ_IMAGES ${MM_TEST_DATA}/images)
set(MM_EQ_IMAGE ${MM_EQ_IMAGES}/case.png)
set(MM_EQ_QUESTION "What modality is this image?")
set(MM_EQ_CANDIDATES "ct,mri,x-ray,pathology")
# Golden guards: the fixture must not sit near a tie (see tests/reference/README.md).
set(MM_EQ_MIN_MARGIN 0.02)
set(MM_EQ_MIN_GATE_GAP 0.001)
set(MM_EQ_TOL 1e-3)

# name | maker arguments (';'-separated)
# stablelm-f32-residual: use_residual MoE (coefficient + mlp); its greedy answer ends with
# <|endoftext|> after 3 tokens, so it also checks the stop at EOS.
set(MM_EQ_CKPTS stablelm-f32 stablelm-bf16 phi-f32 phi-bf16 stablelm-f32-top2 stablelm-f32-residual)
set(MM_EQ_ARGS_stablelm-f32 --backbone stablelm --dtype f32)
set(MM_EQ_ARGS_stablelm-bf16 --backbone stablelm --dtype bf16 --shards 2)
set(MM_EQ_ARGS_phi-f32 --backbone phi --dtype f32)
set(MM_EQ_ARGS_phi-bf16 --backbone phi --dtype bf16)
set(MM_EQ_ARGS_stablelm-f32-top2 --backbone stablelm --dtype f32 --top-k 2)
set(MM_EQ_ARGS_stablelm-f32-residual --backbone stablelm --dtype f32 --residual)
set(MM_EQ_CLASSIFY stablelm-f32 phi-bf16)

add_test(NAME tiny_ckpt_images
         COMMAND ${MM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/make_test_image.py ${MM_EQ_IMAGES})
set_tests_properties(tiny_ckpt_images PROPERTIES FIXTURES_SETUP tiny_images LABELS "model;reference")

foreach(name ${MM_EQ_CKPTS})
  set(dir ${MM_TEST_DATA}/tiny-${name})
  add_test(NAME tiny_ckpt_${name}
           COMMAND ${MM_PYTHON} ${MM_EQ_MAKER} --out ${dir} ${MM_EQ_ARGS_${name}})
  set_tests_properties(tiny_ckpt_${name} PROPERTIES FIXTURES_SETUP tiny_${name}
                       LABELS "model;reference")

  add_test(NAME tiny_golden_${name}
           COMMAND ${MM_PYTHON} ${MM_EQ_REF}/medmoe_ref.py
                   --model ${dir} --vision ${dir}/clip --image ${MM_EQ_IMAGE}
                   --question ${MM_EQ_QUESTION} --max-tokens 16
                   --json ${dir}/golden/generate.json --dump-logits ${dir}/golden/generate.f32
                   --min-margin ${MM_EQ_MIN_MARGIN} --min-gate-gap ${MM_EQ_MIN_GATE_GAP})
  set_tests_properties(tiny_golden_${name} PROPERTIES FIXTURES_SETUP golden_${name}
                       FIXTURES_REQUIRED "tiny_${name};tiny_images" LABELS "model;reference")

  add_test(NAME tiny_fixture_check_${name}
           COMMAND ${MM_PYTHON} ${MM_EQ_REF}/check_fixtures.py --ckpt ${dir}
                   --golden ${dir}/golden/generate.json --golden-logits ${dir}/golden/generate.f32
                   -- ${MM_EQ_ARGS_${name}})
  set_tests_properties(tiny_fixture_check_${name} PROPERTIES FIXTURES_REQUIRED golden_${name}
                       LABELS "model;reference")

  list(FIND MM_EQ_CLASSIFY ${name} classify_idx)
  if(classify_idx GREATER -1)
    add_test(NAME tiny_golden_classify_${name}
             COMMAND ${MM_PYTHON} ${MM_EQ_REF}/medmoe_ref.py
                     --model ${dir} --vision ${dir}/clip --image ${MM_EQ_IMAGE}
                     --question ${MM_EQ_QUESTION} --max-tokens 0
                     --candidates ${MM_EQ_CANDIDATES} --json ${dir}/golden/classify.json
                     --min-gate-gap ${MM_EQ_MIN_GATE_GAP})
    set_tests_properties(tiny_golden_classify_${name} PROPERTIES
                         FIXTURES_SETUP golden_${name}
                         FIXTURES_REQUIRED "tiny_${name};tiny_images" LABELS "model;reference")
  endif()

  if(TARGET medmoe-run)
    set(backends cpu)
    if(MEDMOE_VULKAN)
      list(APPEND backends vulkan)
    endif()
    foreach(backend ${backends})
      set(labels "model;equivalence")
      if(backend STREQUAL "vulkan")
        set(labels "model;equivalence;vulkan")
      endif()
      add_test(NAME model_equiv_${name}_${backend}
               COMMAND ${MM_PYTHON} ${MM_EQ_REF}/run_equivalence.py --run $<TARGET_FILE:medmoe-run>
                       --model ${dir} --vision ${dir}/clip --image ${MM_EQ_IMAGE}
                       --question ${MM_EQ_QUESTION} --max-tokens 16 --backend ${backend}
                       --golden ${dir}/golden/generate.json
                       --golden-logits ${dir}/golden/generate.f32
                       --out-dir ${dir}/out --tol ${MM_EQ_TOL})
      set_tests_properties(model_equiv_${name}_${backend} PROPERTIES
                           FIXTURES_REQUIRED golden_${name} LABELS "${labels}")
      if(classify_idx GREATER -1)
        add_test(NAME model_equiv_classify_${name}_${backend}
                 COMMAND ${MM_PYTHON} ${MM_EQ_REF}/run_equivalence.py
                         --run $<TARGET_FILE:medmoe-run>
                         --model ${dir} --vision ${dir}/clip --image ${MM_EQ_IMAGE}
                         --question ${MM_EQ_QUESTION} --max-tokens 0 --backend ${backend}
                         --candidates ${MM_EQ_CANDIDATES}
                         --golden ${dir}/golden/classify.json
                         --out-dir ${dir}/out-classify --tol ${MM_EQ_TOL})
        set_tests_properties(model_equiv_classify_${name}_${backend} PROPERTIES
                             FIXTURES_REQUIRED golden_${name} LABELS "${labels}")
      endif()
    endforeach()
  endif()
endforeach()
