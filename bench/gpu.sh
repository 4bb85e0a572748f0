#!/usr/bin/env bash
# The scorer's GPU benchmark, in two halves (see bench/scorer_gpu.py):
#
#   bash bench/gpu.sh prepare   # here (make bench-scorer-gpu): var/gpu-bundle from the serving version
#   bash bench/gpu.sh run       # on the lent GPU machine, through the device tool:
#       run(command="bash bench/gpu.sh run", carry=["var/gpu-bundle"], timeout_s=420)
#     -> $OUT/scorer_gpu.json and $OUT/scorer_gpu.log come back; copy the JSON to bench/results/.
#
# `run` installs nothing from outside: the machine's python3 has torch, transformers, tokenizers,
# onnxruntime and safetensors; the two small wheels it lacks (msgspec, structlog) travel in the
# bundle. It is sized to finish in about 2-3 minutes (each measured configuration is capped).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-var/gpu-bundle}

case "${1:-}" in
  prepare)
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "${PYTHON:-.venv/bin/python}" -m bench.scorer_gpu prepare \
      --bundle "$BUNDLE" "${@:2}"
    echo "next, with the device tool: run(command=\"bash bench/gpu.sh run\", carry=[\"$BUNDLE\"], timeout_s=420)"
    ;;
  run)
    test -f "$BUNDLE/bundle.json" || { echo "no bundle at $BUNDLE: run 'make bench-scorer-gpu' first" >&2; exit 2; }
    OUT=${OUT:-bench/results}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/shoprank-site "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="/tmp/shoprank-site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    timeout 290 python3 -m bench.scorer_gpu run --bundle "$BUNDLE" --out "$OUT/scorer_gpu.json" "${@:2}" \
      2>&1 | tee "$OUT/scorer_gpu.log"
    ;;
  *)
    echo "usage: bash bench/gpu.sh prepare|run [options for bench/scorer_gpu.py]" >&2
    exit 2
    ;;
esac
