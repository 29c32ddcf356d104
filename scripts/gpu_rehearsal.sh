#!/usr/bin/env bash
# make gpu-rehearsal: the GPU check on the CPU, in a Python 3.12 environment holding only the
# GPU image's packages (requirements/gpu-image.txt) plus the kit, installed the device's way.
# A wheel missing from the kit, or stubs that refuse the image's grpcio/protobuf, fail here.
#   scripts/gpu_rehearsal.sh [OUT [gpu_check.py options, e.g. --only env,weights]]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.gpu-rehearsal/out}
[ $# -gt 0 ] && shift
VENV=.gpu-rehearsal/venv
if [ -z "${PYTHON312:-}" ]; then
    # (pyenv's shim answers `command -v` even where no 3.12 is selected: run it to know)
    if python3.12 -c '' >/dev/null 2>&1; then PYTHON312=python3.12
    elif command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.12 >/dev/null 2>&1; then
        PYTHON312="$(pyenv prefix 3.12)/bin/python3.12"
    else
        PYTHON312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)
    fi
fi
[ -n "$PYTHON312" ] || { echo "gpu_rehearsal.sh: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
stamp="$VENV/.image-$(sha256sum requirements/gpu-image.txt | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    rm -rf "$VENV"
    "$PYTHON312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements/gpu-image.txt
    touch "$stamp"
fi
stamp_kit=".gpu-kit/.for-$(sha256sum requirements/gpu-kit.txt scripts/gpu_kit.sh | sha256sum | cut -c1-12)"
if [ ! -f "$stamp_kit" ]; then
    PYTHON="$VENV/bin/python" scripts/gpu_kit.sh
    touch "$stamp_kit"
fi
rm -rf "$OUT_DIR"
GPU_SITE=.gpu-rehearsal/site PYTHON="$VENV/bin/python" GPU_CHECK_WORK=.gpu-rehearsal/work \
    bash scripts/gpu_device.sh "$OUT_DIR" --device cpu --narrow 0.0625 --quick --budget-s 3600 "$@"
