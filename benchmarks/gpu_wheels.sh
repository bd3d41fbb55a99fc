#!/usr/bin/env bash
# Wheels for running this project on a GPU machine without network (docs/scaling.md, "Checking a GPU machine").
#
#   bash benchmarks/gpu_wheels.sh download   # here, with a package index: Python 3.12 manylinux x86_64 wheels -> gpu_wheels/
#   bash benchmarks/gpu_wheels.sh install    # there, offline, from the repository root: pip install from gpu_wheels/
#
# The GPU machine is assumed to have torch, torchvision, transformers, timm, accelerate, peft, safetensors,
# tokenizers, matplotlib and tensorboard; this brings what it lacks: diffusers, omegaconf, av, open_clip_torch, ftfy
# and every package they need that those do not already require (`python -m benchmarks.gpu_wheels` lists them,
# pinned to the versions installed here: the versions the tests passed with). gpu_wheels/ is git-ignored and small
# enough (< 64 MiB) to travel with the working tree. WHEELS_DIR overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${WHEELS_DIR:-gpu_wheels}
ROOTS=(diffusers omegaconf av open_clip_torch ftfy)
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the interpreter that holds torch, and its own pip

case "${1:-}" in
download)
    mkdir -p "$DIR"
    PKGS=$("$PY" -m benchmarks.gpu_wheels)
    # --no-deps: PKGS is already the closure, less what the GPU machine has (torch, timm, huggingface-hub, ...)
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d "$DIR" $PKGS
    du -sh "$DIR"
    ;;
install)
    # dependencies are resolved against what is installed, and whatever is missing must be in $DIR
    "$PY" -m pip install --no-index --find-links "$DIR" "${ROOTS[@]}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_wheels.sh download|install" >&2
    exit 2
    ;;
esac
