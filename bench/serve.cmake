# bench/serve.cmake — serving at real size the way users do (issue: bench/serve): a local
# cluster (orchestration/medmoe-cluster: medmoe-router + 4 medmoe-expert, MEDMOE_THREADS=2 each,
# OMP_WAIT_POLICY=PASSIVE) behind the gRPC front door, 1 / 4 / 16 concurrent image cases from two
# tenants: time to first token p50/p99, decode tokens/s per case and in total, a text-only case's
# first token alone vs while an image case is prefilling — beside medmoe-run's single case
# (vision, prefill, decode ms/token; load excluded) in the same run. Prints, never fails.
#
# The full-size checkpoint (StableLM-2-1.6B widths, 24 decoder + 24 CLIP ViT-L/14-336 layers,
# bf16, ~6.8 GB) is used only when MM_BENCH_SERVE_DATA already holds it (generating it is slow);
# otherwise the bench prints the command that makes it and runs the tiny checkpoint. At full
# size one run takes ~30-40 min on 2 cores. See bench/serve/bench_serve.py.
set(MM_BENCH_SERVE_DATA "${CMAKE_BINARY_DIR}/bench-data/serve" CACHE PATH
    "bench/serve: where its checkpoints live (the full one in stablelm2-1.6b-24L-clip24L/)")
if(TARGET medmoe-router AND TARGET medmoe-expert AND TARGET medmoe-run)
  list(APPEND MM_BENCH_COMMANDS
       "/usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/serve/bench_serve.py --router $<TARGET_FILE:medmoe-router> --expert $<TARGET_FILE:medmoe-expert> --run $<TARGET_FILE:medmoe-run> --data ${MM_BENCH_SERVE_DATA} --auto")
endif()
