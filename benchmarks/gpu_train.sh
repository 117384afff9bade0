#!/usr/bin/env bash
# train.py itself on one GPU, in one call of about 5 minutes (H100/H200 machine, 16 cores, no network): a
# ResNet-18 teacher for 1 epoch, then DeiT-Tiny distilled from it for 3 epochs, on gpu_check.sh's synthetic
# ImageNet-sized shards (made here if that did not run first on this machine), 224 px, batch 256, with the
# production defaults (DALI where installed, bf16, channels-last, torch.compile). The synthetic labels carry
# no signal, so accuracies sit at chance: this checks that the trainer runs on CUDA, and measures its own
# images/s and data wait per epoch (epoch 0 includes compilation). Writes $OUT/train_*.log, the runs'
# config.json and metrics.jsonl (no checkpoints), and prints the per-epoch table last, with the DeiT rate as
# a fraction of the compiled step when gpu_check.sh ran before on this machine (its JSON in BENCH_DIR: the
# ceiling of its end-to-end part, else its model-step row).
#
#   bash benchmarks/gpu_train.sh                    # on the GPU machine (DALI as gpu_env.sh says)
#   bash benchmarks/gpu_train.sh --loader torch     # further arguments go to both train.py runs
#   bash benchmarks/gpu_train.sh --dry-run          # here, on the CPU, at tiny sizes
# BENCH_DIR (default /tmp/vitdeit-bench, gpu_check.sh's too) and TRAIN_DIR (/tmp/vitdeit-train) move its folders.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac  # the header above
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
WORK=${BENCH_DIR:-/tmp/vitdeit-bench}  # shared with gpu_check.sh: its images and shards are reused
RUNS=${TRAIN_DIR:-/tmp/vitdeit-train}  # checkpoints stay here, out of $OUT
if [ "${1:-}" = "--dry-run" ]; then
  shift
  DATA=(--device cpu --num-images 24 --batch-size 8 --workers 2)  # batch: only the header line shows it
  TRAIN=(--device cpu --img-size 32 --patch-size 4 --batch-size 8 --workers 2)
else
  DATA=(--device cuda --num-images 4096 --batch-size 256 --workers 16)
  TRAIN=(--device cuda --img-size 224 --batch-size 256 --workers 16)
fi
if [ -f "$WORK/images/Labels.json" ]; then  # gpu_check.sh's synthetic set, whatever its --num-images: reuse it
  DATA+=(--num-images "$(find "$WORK/images/train.X1" -name '*.JPEG' | wc -l)")
fi
$PY benchmarks/throughput.py "${DATA[@]}" --parts data --work-dir "$WORK"
rm -rf "$RUNS"
COMMON=(--data-path "$WORK/shards" "${TRAIN[@]}" --output-dir "$RUNS" --progress false)
$PY train.py "${COMMON[@]}" --model resnet18 --epochs 1 --run-name teacher "$@" 2>&1 | tee "$OUT/train_teacher.log"
$PY train.py "${COMMON[@]}" --model deit_tiny_distill --teacher-ckpt "$RUNS/teacher/best.pth" --allow-weak-teacher \
  --epochs 3 --run-name deit "$@" 2>&1 | tee "$OUT/train_deit.log"
for run in teacher deit; do
  mkdir -p "$OUT/runs/$run" && cp "$RUNS/$run/config.json" "$RUNS/$run/metrics.jsonl" "$OUT/runs/$run/"
done
$PY - "$RUNS" "$WORK/throughput.json" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

from benchmarks.throughput import STEP_SWITCHES
from vitdeit.distributed import resolve_device
from vitdeit.engine import compile_mode

switches = lambda s: ", ".join(f"{k.replace('_', '-')} {s.get(k, 'default')}" for k in STEP_SWITCHES)  # each one

runs, bench = Path(sys.argv[1]), Path(sys.argv[2])
ceiling = None
if bench.exists():  # the compiled bf16 channels-last DeiT + teacher step of gpu_check.sh, same machine
    r = json.loads(bench.read_text())
    if r.get("end_to_end"):  # timed in turns with the loaders: the later, steadier figure
        ceiling = r["end_to_end"][0]["ceiling_images_per_s"]
    else:
        ceiling = next((m["images_per_s"] for m in r.get("model_step", [])
                        if m["model"].startswith("deit") and m["compile"]), None)
    cfg = json.loads((runs / "deit" / "config.json").read_text())  # names the switches as throughput.py does
    cfg["compile_mode"] = compile_mode(cfg["compile_mode"], torch.device(resolve_device(cfg["device"])), 1)  # as ran
    if ceiling and switches(r["settings"]) != switches(cfg):  # (the JSON's settings hold the mode that ran)
        print(f"(the step's ceiling was timed with {switches(r['settings'])}; train.py ran with {switches(cfg)})")
print(f"{'run':8s} {'epoch':>5s} {'img/s':>9s} {'data wait':>9s} {'val top-1':>9s}" + ("  of the step" if ceiling else ""))
for run in ("teacher", "deit"):
    for line in (runs / run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        frac = f"  {m['images_per_s'] / ceiling:12.2f}" if ceiling and run == "deit" else ""
        print(f"{run:8s} {m['epoch']:5d} {m['images_per_s']:9.0f} {100 * m['data_wait_frac']:8.0f}% "
              f"{m['val_top1']:8.2f}%" + frac)
PYEOF
