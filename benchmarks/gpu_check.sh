#!/usr/bin/env bash
# The ready GPU check: one call, at most ~8 minutes on one H100/H200 machine (16 cores, no network) where
# torch, torchvision and timm are installed. Makes a synthetic ImageNet-sized JPEG set there, packs it, and
# measures packing, the loaders, the model step and end to end at 224 px, batch 256. Writes
# $OUT/throughput.json and $OUT/throughput.log and prints the table last.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # here, on the CPU, at tiny sizes: proves the script before the GPU call
#   bash benchmarks/gpu_check.sh --parts e2e --e2e-unit steps --steps 40 --workers 12   # one part, other settings
#
# Pure-Python dependencies missing there (webdataset, braceexpand) come as wheels in the git-ignored wheels/:
#   pip download --no-deps -d wheels webdataset braceexpand
# DALI (optional: its rows are skipped without it) comes in parts: see benchmarks/dali_parts.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the GPU machine's python3 is the one holding torch
if ! $PY -c "import webdataset" 2>/dev/null; then
  ls wheels/*.whl >/dev/null 2>&1 || { echo "webdataset is missing and wheels/ is empty: pip download --no-deps -d wheels webdataset braceexpand"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --target /tmp/vitdeit-pydeps wheels/*.whl
  export PYTHONPATH=/tmp/vitdeit-pydeps:${PYTHONPATH:-}
fi
# DALI, where it is not installed and benchmarks/dali_parts.sh's parts were brought (the last call carrying them
# runs this script): reassemble, check the SHA-256, install into a private folder
if ! $PY -c "import nvidia.dali" 2>/dev/null && ls dali_parts/dali.tar.part-* >/dev/null 2>&1; then
  cat dali_parts/dali.tar.part-* > /tmp/vitdeit-dali.tar
  [ "$(sha256sum < /tmp/vitdeit-dali.tar | cut -d' ' -f1)" = "$(cut -d' ' -f1 dali_parts/dali.tar.sha256)" ] || {
    echo "dali_parts/: the parts present do not make the tar dali_parts.sh wrote; bring every part (and dali.tar.sha256)"; exit 1; }
  rm -rf /tmp/vitdeit-dali-whl && mkdir -p /tmp/vitdeit-dali-whl && tar -C /tmp/vitdeit-dali-whl -xf /tmp/vitdeit-dali.tar
  $PY -m pip install -q --no-index --no-deps --target /tmp/vitdeit-dali /tmp/vitdeit-dali-whl/*.whl
  export PYTHONPATH=/tmp/vitdeit-dali:${PYTHONPATH:-}
fi
# not silent: a broken install (a missing dependency, a wrong PYTHONPATH) shows its import error here
$PY -c "import nvidia.dali as d; print('DALI', d.__version__)" || echo "DALI: not importable (above); its loader rows are skipped"
if [ "${1:-}" = "--dry-run" ]; then
  shift
  ARGS=(--device cpu --num-images 48 --img-size 64 --batch-size 8 --steps 1 --warmup-steps 1 --repeats 1 --workers 2)
else
  ARGS=(--device cuda --num-images 4096 --img-size 224 --batch-size 256 --steps 10 --warmup-steps 3 --repeats 3 --workers 16 --loader-workers 16)
fi
# any further arguments go to throughput.py after these (the last of a flag wins): e.g. --parts e2e --workers 12
$PY benchmarks/throughput.py "${ARGS[@]}" "$@" --work-dir /tmp/vitdeit-bench --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
