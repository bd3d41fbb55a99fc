#!/usr/bin/env bash
# Wheels for running this project on a GPU machine without network (docs/scaling.md, "Checking a GPU machine").
#
#   bash benchmarks/gpu_wheels.sh download   # here, with a package index: Python 3.12 manylinux x86_64 wheels -> gpu_wheels/
#   bash benchmarks/gpu_wheels.sh install    # there, offline, from the repository root: pip install from gpu_wheels/
#
# The GPU machine is assumed to have torch, torchvision, transformers, peft, accelerate, safetensors, tokenizers, timm,
# matplotlib and tensorboard; this brings what it lacks (diffusers, omegaconf, av, open_clip_torch, ftfy) and their
# pure-Python dependencies that those do not pull in, never torch. Versions are pinned to the ones installed where
# the download runs (the versions the tests passed with). gpu_wheels/ is git-ignored and small enough (< 64 MiB) to
# travel with the working tree. WHEELS_DIR overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${WHEELS_DIR:-gpu_wheels}
PKGS=(diffusers omegaconf av open_clip_torch ftfy importlib_metadata zipp wcwidth)

pinned() {  # "name==version" where the package is installed here, else "name"
    for p in "${PKGS[@]}"; do
        v=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null || true)
        echo "${p}${v:+==$v}"
    done
}

case "${1:-}" in
download)
    mkdir -p "$DIR"
    # --no-deps: the dependencies the GPU machine already has (torch, timm, huggingface-hub, ...) are not fetched
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$DIR" $(pinned)
    du -sh "$DIR"
    ;;
install)
    # dependencies are resolved against what is installed, and whatever is missing must be in $DIR
    pip install --no-index --find-links "$DIR" "${PKGS[@]}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_wheels.sh download|install" >&2
    exit 2
    ;;
esac
