#!/usr/bin/env bash
# The one install recipe, used by `make install` and by the Dockerfile.
#   PIP=.venv/bin/pip scripts/install.sh [--dev] [--editable]
# Extra package indexes (torch's CUDA or CPU wheels) come in through pip's own
# PIP_EXTRA_INDEX_URL. gfpgan/basicsr/facexlib go in with --no-deps: see the `server` extra in
# pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-pip}
extras=server
editable=()
for arg in "$@"; do
    case "$arg" in
        --dev) extras=server,dev ;;
        --editable) editable=(-e) ;;
        *) echo "install.sh: unknown option $arg (use --dev, --editable)" >&2; exit 2 ;;
    esac
done
# basicsr is built from its sdist without build isolation, which needs these first.
"$PIP" install -q --upgrade pip setuptools wheel cython numpy
"$PIP" install -q "${editable[@]}" ".[$extras]"
"$PIP" install -q --no-deps --no-build-isolation -r requirements/gfpgan-nodeps.txt
if [ "$extras" = server,dev ]; then
    "$PIP" install -q --no-deps --no-build-isolation -r requirements/reference-nodeps.txt
fi
