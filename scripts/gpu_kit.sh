#!/usr/bin/env bash
# make gpu-kit: every wheel scripts/gpu_check.py needs on the GPU machine, into .gpu-kit/.
#   scripts/gpu_kit.sh [KIT_DIR]
# The GPU machine reaches no network: this runs here, where PyPI is reachable. Wheels are for
# CPython 3.12 on x86-64 Linux (the GPU image's Python); basicsr is built from its sdist (it is
# pure Python). Nothing here is a model weight: the check makes random-valued ones there.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.gpu-kit}
PY=${PYTHON:-python3}
rm -rf "$KIT"
mkdir -p "$KIT"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# Everything but basicsr, as binary wheels for CPython 3.12.
grep -v -E '^\s*(#|$)|^basicsr' requirements/gpu-kit.txt > "$KIT/.wheels.txt"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$KIT" -r "$KIT/.wheels.txt"
# basicsr: sdist only; its setup.py needs setuptools, wheel, cython, numpy and torch importable
# (it asks for them but builds no extension without --cuda_ext), hence no build isolation.
"$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary=basicsr -w "$KIT" \
    "$(grep -E '^basicsr==' requirements/gpu-kit.txt)"
rm -f "$KIT/.wheels.txt"
count=$(ls "$KIT"/*.whl | wc -l)
size=$(du -sh "$KIT" | cut -f1)
echo "gpu-kit: $count wheels, $size in $KIT"
ls "$KIT"
