#!/usr/bin/env bash
# NVIDIA DALI for a GPU machine with no network, where one call carries at most 64 MiB: download the CUDA 13
# build for Python 3.12 and its dependencies here (~260 MB), tar them and split the tar into 55 MB parts in the
# git-ignored dali_parts/, with the whole tar's SHA-256 beside them.
#
#   bash benchmarks/dali_parts.sh            # here, with the package registry reachable
#
# Then send the parts to the GPU machine one call each (carry: dali_parts/dali.tar.part-aa, then -ab, ...; a
# part already there stays), the last one with dali_parts/dali.tar.sha256 too and the command
# `bash benchmarks/gpu_check.sh`, which reassembles the tar, checks it and installs DALI before measuring.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac  # the header above
[ $# -eq 0 ] || { echo "dali_parts.sh takes no arguments (got: $*); --help prints its use" >&2; exit 2; }
cd "$(dirname "$0")/.."
DL=$(mktemp -d)
PIP=${PIP:-pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$DL" \
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 'nvidia-nvjpeg>=13,<14' \
  astunparse gast optree makefun libcst nvtx
rm -rf dali_parts && mkdir dali_parts
tar -C "$DL" -cf dali_parts/dali.tar .
(cd dali_parts && sha256sum dali.tar > dali.tar.sha256 && split -b 55M dali.tar dali.tar.part- && rm dali.tar)
rm -rf "$DL"
ls -l dali_parts
