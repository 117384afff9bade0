#!/usr/bin/env bash
# The ready GPU check: one call of about 3.5 minutes (8 at most) on one H100/H200 machine (16 cores, no network) where
# torch, torchvision and timm are installed. Makes a synthetic ImageNet-sized JPEG set there, packs it, and
# measures packing, the loaders, the model step and end to end at 224 px, batch 256. Writes
# $OUT/throughput.json and $OUT/throughput.log and prints the table last.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # here, on the CPU, at tiny sizes: proves the script before the GPU call
#   bash benchmarks/gpu_check.sh --parts e2e --e2e-unit steps --steps 40 --workers 12   # one part, other settings
#   (further arguments go to throughput.py after these: python benchmarks/throughput.py --help lists them)
#   bash benchmarks/gpu_check.sh --profile "${OUT:-bench_out}/profile"   # + one profiled end-to-end window per unit
#
# What is missing there (webdataset and braceexpand as wheels in wheels/, DALI in parts): see gpu_env.sh.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac  # the header above
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh  # PY, with webdataset and (where its parts were brought) DALI importable
if [ "${1:-}" = "--dry-run" ]; then
  shift
  ARGS=(--device cpu --num-images 48 --img-size 64 --batch-size 8 --steps 1 --warmup-steps 1 --repeats 1 --workers 2)
else
  ARGS=(--device cuda --num-images 4096 --img-size 224 --batch-size 256 --steps 10 --warmup-steps 3 --repeats 3 --workers 16 --loader-workers 16)
fi
# any further arguments go to throughput.py after these (the last of a flag wins): e.g. --parts e2e --workers 12
BENCH_DIR=${BENCH_DIR:-/tmp/vitdeit-bench}
$PY benchmarks/throughput.py "${ARGS[@]}" "$@" --work-dir "$BENCH_DIR" --json "$OUT/throughput.json" 2>&1 \
  | tee "$OUT/throughput.log"
# beside the images too: every call gets an empty $OUT, and gpu_train.sh in a later call on this warm machine
# compares its rate with this ceiling
cp "$OUT/throughput.json" "$BENCH_DIR/throughput.json"
