# Sourced by gpu_check.sh and gpu_train.sh, from the repository root: sets PY (the python3 that holds torch, or
# $PYTHON) and makes what a GPU machine without network lacks importable from private folders under /tmp:
# - webdataset and braceexpand, pure Python, as wheels in the git-ignored wheels/:
#     pip download --no-deps -d wheels webdataset braceexpand
# - DALI (optional: without it the DALI rows are skipped, train.py uses the PyTorch loader), in the parts
#   benchmarks/dali_parts.sh writes to dali_parts/; the call that brings the last part reassembles them.
# On a warm machine the folders stay between calls: a second script finds DALI installed.
PY=${PYTHON:-python3}  # the GPU machine's python3 is the one holding torch
$PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null || {
  echo "$PY has no torch: set PYTHON to the interpreter that has it, e.g. PYTHON=.venv/bin/python"; exit 1; }
# has MODULE: importable? DALI is imported (1 s; a broken install counts as missing, and is replaced below);
# webdataset is only looked up: importing it imports torch, 2-4 s a time, which each script paid twice
has() {
  if [ "$1" = webdataset ]; then
    $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('webdataset') is None)" 2>/dev/null
  else
    $PY -c "import $1" 2>/dev/null
  fi
}
# a folder an earlier call on this (warm) machine installed is used again, only where the import fails without it
reuse() {  # reuse MODULE FOLDER
  if ! has "$1" && [ -d "$2" ] && PYTHONPATH=$2:${PYTHONPATH:-} has "$1"; then
    export PYTHONPATH=$2:${PYTHONPATH:-}
  fi
}
reuse webdataset /tmp/vitdeit-pydeps
reuse nvidia.dali /tmp/vitdeit-dali
if ! has webdataset; then
  ls wheels/*.whl >/dev/null 2>&1 || { echo "webdataset is missing and wheels/ is empty: pip download --no-deps -d wheels webdataset braceexpand"; exit 1; }
  rm -rf /tmp/vitdeit-pydeps  # pip --target skips packages already in a folder, broken ones too
  $PY -m pip install -q --no-index --no-deps --target /tmp/vitdeit-pydeps wheels/*.whl
  [[ ":${PYTHONPATH:-}:" == *:/tmp/vitdeit-pydeps:* ]] || export PYTHONPATH=/tmp/vitdeit-pydeps:${PYTHONPATH:-}
fi
# DALI, where it is not installed and benchmarks/dali_parts.sh's parts were brought (the last call carrying them
# runs this script): reassemble, check the SHA-256, install into a private folder
if ! has nvidia.dali && ls dali_parts/dali.tar.part-* >/dev/null 2>&1; then
  cat dali_parts/dali.tar.part-* > /tmp/vitdeit-dali.tar
  [ "$(sha256sum < /tmp/vitdeit-dali.tar | cut -d' ' -f1)" = "$(cut -d' ' -f1 dali_parts/dali.tar.sha256)" ] || {
    echo "dali_parts/: the parts present do not make the tar dali_parts.sh wrote; bring every part (and dali.tar.sha256)"; exit 1; }
  rm -rf /tmp/vitdeit-dali-whl && mkdir -p /tmp/vitdeit-dali-whl && tar -C /tmp/vitdeit-dali-whl -xf /tmp/vitdeit-dali.tar
  rm -rf /tmp/vitdeit-dali
  $PY -m pip install -q --no-index --no-deps --target /tmp/vitdeit-dali /tmp/vitdeit-dali-whl/*.whl
  [[ ":${PYTHONPATH:-}:" == *:/tmp/vitdeit-dali:* ]] || export PYTHONPATH=/tmp/vitdeit-dali:${PYTHONPATH:-}
fi
# not silent: a broken install (a missing dependency, a wrong PYTHONPATH) shows its import error here
$PY -c "import nvidia.dali as d; print('DALI', d.__version__)" || echo "DALI: not importable (above); its loader rows are skipped"
