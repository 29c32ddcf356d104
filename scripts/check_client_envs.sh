#!/usr/bin/env bash
# The client and the MuseTalk adapter where their users live: Python 3.10 pinned like
# MuseTalk's environment, and the newest versions on the newest Python here. For each: a fresh
# venv, the pins, a frozen list, `pip install .` (the README's way), `pip check`, the list
# again (no pin may move: only our package and what it adds may appear), then the client's and
# the adapter's tests there, against gfpgan-serve run from the main environment (.venv, made by
# `make install`; GFPGAN_TEST_SERVER_PYTHON), as MuseTalk would reach a service elsewhere.
#   scripts/check_client_envs.sh [musetalk|oldest|newest ...]   (default all three)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SERVER_PYTHON=${GFPGAN_TEST_SERVER_PYTHON:-$ROOT/.venv/bin/python}
"$SERVER_PYTHON" -c "import server.app" 2>/dev/null || {
    echo "check_client_envs: the service's Python $SERVER_PYTHON cannot import server.app; run make install first" >&2
    exit 2
}
TESTS=(tests/test_client.py tests/test_musetalk_adapter.py tests/test_musetalk_plan.py)
WORK=${CLIENT_ENVS_DIR:-/tmp/gfpgan-client-envs}
find_python() {  # find_python 3.10
    local v=$1 found
    found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v"*/bin/"python$v" 2>/dev/null | sort -V | tail -1)
    if [ -z "$found" ] && "python$v" -c pass >/dev/null 2>&1; then found=$(command -v "python$v"); fi
    echo "$found"
}
check() {  # check NAME PYTHON_VERSION PIN...
    local name=$1 version=$2; shift 2
    local python; python=$(find_python "$version")
    [ -n "$python" ] || { echo "check_client_envs: no Python $version here" >&2; exit 2; }
    local venv="$WORK/$name"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip 2>/dev/null
    "$venv/bin/python" -m pip install -q "$@" 2>/dev/null
    "$venv/bin/python" -m pip freeze | sort > "$venv/before.txt"
    "$venv/bin/python" -m pip install -q "$ROOT" 2>/dev/null
    "$venv/bin/python" -m pip check
    "$venv/bin/python" -m pip freeze | sort > "$venv/after.txt"
    # every line of before must still be there; the new lines are ours and what we add
    local moved; moved=$(comm -23 "$venv/before.txt" "$venv/after.txt")
    if [ -n "$moved" ]; then
        echo "check_client_envs: $name: installing the client moved these pins:" >&2
        echo "$moved" >&2
        exit 1
    fi
    echo "$name: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'); added: $(comm -13 "$venv/before.txt" "$venv/after.txt" | sed 's/ @ .*//' | tr '\n' ' ')"
    "$venv/bin/python" -m pip install -q pytest pytest-asyncio pytest-timeout 2>/dev/null
    # no torch here: the tests must not need it (the service's Python makes the weights)
    if "$venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "check_client_envs: $name has torch; it should not" >&2; exit 1
    fi
    # the tests import from the checkout (pytest's pythonpath), the packages from this venv
    (cd "$ROOT" && GFPGAN_TEST_SERVER_PYTHON="$SERVER_PYTHON" "$venv/bin/python" -m pytest -q \
        -p no:cacheprovider -p no:warnings "${TESTS[@]}")
}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(musetalk oldest newest)
for target in "${targets[@]}"; do
    case "$target" in
        # MuseTalk's requirements.txt: numpy 1.23.5, tensorflow 2.12 (protobuf >=3.20.3,<5),
        # opencv-python 4.9.0.80, omegaconf (PyYAML); grpcio as tensorflow 2.12 resolves today.
        musetalk) check musetalk 3.10 numpy==1.23.5 protobuf==4.23.4 opencv-python==4.9.0.80 \
                      omegaconf==2.3.0 PyYAML==6.0.1 grpcio==1.85.3 ;;
        # The floors pyproject.toml declares, on the oldest Python it allows.
        oldest) check oldest 3.10 numpy==1.23.5 protobuf==3.20.3 grpcio==1.42.0 \
                    opencv-python-headless==4.8.1.78 omegaconf==2.3.0 PyYAML==6.0.1 ;;
        newest) check newest 3.13 numpy protobuf opencv-python-headless grpcio omegaconf ;;
        *) echo "check_client_envs: unknown target $target (musetalk, oldest, newest)" >&2; exit 2 ;;
    esac
done
