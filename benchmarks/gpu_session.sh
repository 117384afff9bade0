#!/usr/bin/env bash
# The next GPU session's measurements (BENCHMARKS.md, How to rerun it) in ONE call of at most ~9.5 minutes on one
# H100/H200 machine (16 cores, no network), after the calls that bring DALI's parts: a lent machine stays warm only
# ~30 s between calls, and every restart costs 1-2 minutes of the session's 15. In order of what each tells, each
# step under the time left of BUDGET seconds (default 560; a step whose estimate no longer fits is skipped, and
# says so), each DALI measurement with two prefetch depths (--dali-prefetch 2,4: train.py's default and a deeper
# queue; the legacy executor, A/B-tested in two sessions, was no faster):
#   profile   gpu_check.sh --parts loaders,e2e, 40-step windows, --profile, at the defaults (on a GPU the step as
#             CUDA graphs): the loaders alone, end to end against the ceiling in turns, and what the GPU does in
#             one window per unit (benchmarks/traces.py)
#   launches  the end-to-end part with the step launched kernel by kernel (--compile-mode default, as under DDP) on a
#             side stream at the highest priority (--step-stream high), the best such setting on 2026-12-04
#   train     gpu_train.sh: train.py itself, a teacher and then DeiT, 4 epochs each (1 and 3 in the dry run), with the
#             step's setting and DALI prefetch depth that fed the step fastest end to end from DALI's original
#             shards in the two steps before (another than train.py's defaults must beat them by 3 %), its img/s
#             against that setting's ceiling; if a switched run fails, once more with the defaults
#   side      as launches, on a side stream at the default priority (--step-stream side): is it the priority or
#             leaving PyTorch's legacy default stream that helps? (the steps before take ~470 s of the 560: it may
#             be skipped)
# A failed step does not stop the next. $OUT gets session.log (every step's output, in order), session.tar (each
# step's JSON, logs and runs) and profile.tar (the traces; over 15 MiB, split into profile.tar.part-aa, -ab, ...:
# the device returns no file over 16 MiB, and 8 files or 64 MiB in all).
#
#   bash benchmarks/gpu_session.sh              # on the GPU machine, in the call that brings DALI's last part
#   bash benchmarks/gpu_session.sh --dry-run    # here, on the CPU, at tiny sizes (1.5-2 minutes on 2 idle cores)
#   BUDGET=300 bash benchmarks/gpu_session.sh   # a shorter call: the later steps are skipped
#   TRAIN_SETTING=launches:pf4 bash benchmarks/gpu_session.sh --dry-run   # the train step's setting
#                                                                         # (STEP:pfDEPTH) chosen, not measured
set -uo pipefail  # not -e: one step failing must leave the others their turn
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac  # the header above
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: pack() writes to it from inside $WORK
BUDGET=${BUDGET:-560}
WORK=${SESSION_DIR:-/tmp/vitdeit-session}  # each step's own $OUT; tarred into $OUT after every step
rm -rf "$WORK" && mkdir -p "$WORK"
DEPTHS=(--dali-prefetch 2,4)
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--dry-run)
  E2E=(--e2e-unit steps --steps 4 --warmup-steps 1)
  HIGH=()  # a CPU refuses --step-stream (a CUDA stream): the plumbing alone is tried
  SIDE=()
  TRAIN_LAUNCHES=(--compile-mode default)  # train.py's flags for the launches step's setting
  EPOCHS=()
  EST=(60 30 40 30)  # seconds each step is given at least, dry run
else
  DRY=()
  E2E=(--e2e-unit steps --steps 40 --warmup-steps 5)
  HIGH=(--step-stream high)
  SIDE=(--step-stream side)
  TRAIN_LAUNCHES=(--compile-mode default --step-stream high)
  EPOCHS=(--epochs 4)  # 16-step epochs of 0.4 s: more of them, a steadier rate (a few seconds each, with val)
  # from the H200 runs of 2026-12-04 (BENCHMARKS.md: 182, 76 and 139 s with 5 epochs), two more DALI units each
  EST=(240 100 130 90)
fi
pack() {  # the session's files into $OUT after each step: what a time-out leaves is still there
  tar -C "$WORK" --exclude='*.json.gz' -cf "$OUT/session.tar" . 2>/dev/null
  if find "$WORK" -name '*.json.gz' | grep -q .; then
    if ! (cd "$WORK" && find . -name '*.json.gz' -print0 | tar --null -T - -cf "$OUT/profile.tar"); then
      echo "== the traces could not be written to $OUT/profile.tar (they stay in $WORK)"
      return
    fi
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
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t)) s, ${SECONDS} s into the session"
  pack
  return $rc
}

session() {
  step profile "${EST[0]}" benchmarks/gpu_check.sh "${DRY[@]}" --parts loaders,e2e "${E2E[@]}" "${DEPTHS[@]}" \
    --profile "$WORK/profile/profile"
  step launches "${EST[1]}" benchmarks/gpu_check.sh "${DRY[@]}" --parts e2e "${E2E[@]}" --compile-mode default \
    "${HIGH[@]}" "${DEPTHS[@]}"
  local best rates train
  read -r best rates < <(python3 benchmarks/pick_setting.py "$WORK" profile launches || echo profile:pf2)
  best=${TRAIN_SETTING:-$best}
  if ! [[ $best =~ ^(profile|launches):pf([1-9][0-9]*)$ ]]; then  # a TRAIN_SETTING of another form: the defaults
    echo "== TRAIN_SETTING '$best' is not STEP:pfDEPTH (STEP profile or launches; e.g. launches:pf4): the defaults"
    best=profile:pf2
  fi
  case ${best%%:*} in
    launches) train=("${TRAIN_LAUNCHES[@]}") ;;
    *) train=() ;;
  esac
  [ "${best#*:}" = pf2 ] || train+=(--dali-prefetch "${best#*:pf}")
  echo "== end to end from shards_dali: ${rates:-none measured}; train.py runs with the setting of '$best'" \
    "(${train[*]:-its defaults})"
  # train.py's rate against the step run the same way: that step's ceiling (gpu_train.sh reads it from BENCH_DIR)
  if [ -f "$WORK/${best%%:*}/throughput.json" ]; then
    cp "$WORK/${best%%:*}/throughput.json" "${BENCH_DIR:-/tmp/vitdeit-bench}/throughput.json"
  fi
  if ! step train "${EST[2]}" benchmarks/gpu_train.sh "${DRY[@]}" "${EPOCHS[@]}" "${train[@]}" \
      && [ ${#train[@]} -gt 0 ]; then
    [ -f "$WORK/profile/throughput.json" ] && cp "$WORK/profile/throughput.json" "${BENCH_DIR:-/tmp/vitdeit-bench}/"
    mv "$WORK/train" "$WORK/train-${best/:/-}"
    step train "${EST[2]}" benchmarks/gpu_train.sh "${DRY[@]}" "${EPOCHS[@]}"
  fi
  step side "${EST[3]}" benchmarks/gpu_check.sh "${DRY[@]}" --parts e2e "${E2E[@]}" --compile-mode default \
    "${SIDE[@]}" "${DEPTHS[@]}"
  pack
}

session 2>&1 | tee "$OUT/session.log"
echo "== the session's files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
