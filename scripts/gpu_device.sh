#!/usr/bin/env bash
# The device command: install the kit (make gpu-kit) without touching the image's own packages,
# then run the GPU check. On a lent GPU machine, from the repository root:
#   bash scripts/gpu_device.sh            # report.md, summary.json, gpu-check.tar.gz into $OUT
#                                         # (with $OUT set: --budget-s 460 --end-s 550 unless given)
#   bash scripts/gpu_device.sh --only memory,realtime   # a second call, same machine: the rest
#   bash scripts/gpu_device.sh DIR [options]            # with no $OUT: everything into DIR
# The rehearsal runs the same script with --device cpu --narrow 0.0625 --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-.gpu-kit}
SITE=${GPU_SITE:-/tmp/gpu-site}
PY=${PYTHON:-python3}
ls "$KIT"/*.whl >/dev/null 2>&1 || { echo "gpu_device.sh: no wheels in $KIT: run 'make gpu-kit' here first and carry $KIT" >&2; exit 2; }
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then
    # On the device machine: work in /tmp (a second call on the warm machine finds the first
    # one's weights and tables there), bring back three files (the tool returns at most 8).
    # The tool kills a call at 600 s, and a killed call brings back nothing: by default no step
    # starts after 460 s and whatever runs at 550 s is stopped before the reports are packed
    # (options given to this script come later and win).
    exec "$PY" scripts/gpu_check.py /tmp/gpu-check-out --pack "$OUT" --budget-s 460 --end-s 550 "$@"
fi
exec "$PY" scripts/gpu_check.py "$@"
