#!/bin/bash
# Source on the lent GPU machine (after ../shared/gpu's wheel bundle is installed) from the repo root:
#   source scripts/gpu_env.sh && python3 -P -m pytest -q tests/gpu && python3 -P scripts/bench_quant_gemm.py
# Assembles this checkout as the installed layout (kernels/ and server/ under trainserve/) in
# /tmp/tspkg and puts it first on PYTHONPATH; run Python with -P so the checkout's own trainserve/
# (which lacks those subpackages) does not shadow it.
source /root/gpu-env.sh
rm -rf /tmp/tspkg && mkdir -p /tmp/tspkg/trainserve
cp -r trainserve/. /tmp/tspkg/trainserve/
cp -r kernels /tmp/tspkg/trainserve/kernels
cp -r server /tmp/tspkg/trainserve/server
export PYTHONPATH=/tmp/tspkg:${PYTHONPATH} PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
