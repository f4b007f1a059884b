# bench/model.cmake — medmoe-run (CPU backend) time to first token and decode tokens/s on
# a checkpoint with the real StableLM-2-1.6B dimensions (4 of 24 layers, CLIP ViT-L/14-336
# sized tower with 4 of 24 layers; random bf16 weights, generated once into
# <build>/bench-data/model/ by tools/make_tiny_checkpoint.py), beside the PyTorch
# reference on the same checkpoint and 2 threads. About 2-3 min (plus ~1 min the first
# time, to generate the 1.9 GB checkpoint). See bench/model/bench_model.py.
if(TARGET medmoe-run)
  list(APPEND MM_BENCH_COMMANDS
       "/usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/model/bench_model.py --run $<TARGET_FILE:medmoe-run> --data ${CMAKE_BINARY_DIR}/bench-data/model --threads 2")
endif()
