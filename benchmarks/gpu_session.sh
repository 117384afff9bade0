#!/usr/bin/env bash
# The next GPU session's measurements (BENCHMARKS.md, How to rerun it, steps 1-4) in ONE call of at most ~9.5
# minutes on one H100/H200 machine (16 cores, no network), after the calls that bring DALI's parts: a lent machine
# stays warm only ~30 s between calls, and every restart costs 1-2 minutes of the session's 15. In order of what
# each tells, each step under the time left of BUDGET seconds (default 560; a step whose estimate no longer fits is
# skipped, and says so):
#   profile   gpu_check.sh --parts loaders,e2e, 40-step windows, --profile: the loaders alone, end to end against
#             the ceiling in turns, and what the GPU does in one window per unit (benchmarks/traces.py)
#   high      the end-to-end part with the step on a side CUDA stream at the highest priority (--step-stream high)
#   graphs    the end-to-end part with the step as CUDA graphs (--compile-mode reduce-overhead)
#   train     gpu_train.sh: train.py itself, a 1-epoch teacher and 3 DeiT epochs, its img/s against the ceiling
# A failed step does not stop the next. $OUT gets session.log (every step's output, in order), session.tar (each
# step's JSON, logs and runs) and profile.tar (the traces; over 15 MiB, split into profile.tar.part-aa, -ab, ...:
# the device returns no file over 16 MiB, and 8 files or 64 MiB in all).
#
#   bash benchmarks/gpu_session.sh              # on the GPU machine, in the call that brings DALI's last part
#   bash benchmarks/gpu_session.sh --dry-run    # here, on the CPU, at tiny sizes (3.5 minutes on 2 cores)
#   BUDGET=300 bash benchmarks/gpu_session.sh   # a shorter call: the later steps are skipped
set -uo pipefail  # not -e: one step failing must leave the others their turn
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-560}
WORK=${SESSION_DIR:-/tmp/vitdeit-session}  # each step's own $OUT; tarred into $OUT after every step
rm -rf "$WORK" && mkdir -p "$WORK"
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--dry-run)
  E2E=(--e2e-unit steps --steps 4 --warmup-steps 1)
  HIGH=()  # a CPU refuses --step-stream (a CUDA stream): the plumbing alone is tried
  GRAPHS=(--compile-mode reduce-overhead --compile)  # a CPU compiles only with --compile
  EST=(60 30 30 40)  # seconds each step is given at least, dry run
else
  DRY=()
  E2E=(--e2e-unit steps --steps 40 --warmup-steps 5)
  HIGH=(--step-stream high)
  GRAPHS=(--compile-mode reduce-overhead)
  EST=(200 90 110 120)  # from the H200 runs of 2026-11-28 (BENCHMARKS.md): one compilation each, ~40 s
fi
pack() {  # the session's files into $OUT after each step: what a time-out leaves is still there
  tar -C "$WORK" --exclude='*.json.gz' -cf "$OUT/session.tar" . 2>/dev/null
  if find "$WORK" -name '*.json.gz' | grep -q .; then
    (cd "$WORK" && find . -name '*.json.gz' -print0 | tar --null -T - -cf "$OUT/profile.tar")
    if [ "$(stat -c %s "$OUT/profile.tar")" -gt $((15 << 20)) ]; then  # the device returns no file over 16 MiB
      rm -f "$OUT"/profile.tar.part-* && split -b 15M "$OUT/profile.tar" "$OUT/profile.tar.part-" \
        && rm "$OUT/profile.tar"  # (cat the parts to rebuild it; 64 MiB in all come back: 4 parts at most)
    fi
  fi
}

step() {  # step NAME ESTIMATE_S SCRIPT ARGS...: run it if ESTIMATE_S seconds are left, within what is left
  local name=$1 est=$2 left=$((BUDGET - SECONDS))
  shift 2
  if [ "$left" -lt "$est" ]; then
    echo "== $name: skipped (${left} s of BUDGET ${BUDGET} s left, it needs about ${est} s)"
    return
  fi
  echo "== $name: $* ($(date -u +%H:%M:%S) UTC, ${left} s left)"
  mkdir -p "$WORK/$name"
  local t=$SECONDS
  OUT="$WORK/$name" timeout --kill-after=10 "$left" bash "$@"  # (the whole process group: the Python steps too)
  echo "== $name: exit $? after $((SECONDS - t)) s, ${SECONDS} s into the session"
  pack
}

session() {
  step profile "${EST[0]}" benchmarks/gpu_check.sh "${DRY[@]}" --parts loaders,e2e "${E2E[@]}" \
    --profile "$WORK/profile/profile"
  step high "${EST[1]}" benchmarks/gpu_check.sh "${DRY[@]}" --parts e2e "${E2E[@]}" "${HIGH[@]}"
  step graphs "${EST[2]}" benchmarks/gpu_check.sh "${DRY[@]}" --parts e2e "${E2E[@]}" "${GRAPHS[@]}"
  # train.py's rate against the step as train.py runs it (default stream and compile mode): the first step's ceiling
  if [ -f "$WORK/profile/throughput.json" ]; then
    cp "$WORK/profile/throughput.json" "${BENCH_DIR:-/tmp/vitdeit-bench}/throughput.json"
  fi
  step train "${EST[3]}" benchmarks/gpu_train.sh "${DRY[@]}"
  pack
}

session 2>&1 | tee "$OUT/session.log"
echo "== the session's files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
