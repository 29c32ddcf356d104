# gfpgan-serve in a container: CUDA image by default, CPU image with BASE_IMAGE/TORCH_INDEX_URL.
#   GPU: docker build -t gfpgan-service .
#   CPU: docker build -t gfpgan-service:cpu --build-arg BASE_IMAGE=python:3.12-slim \
#          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Weights are never in the image: they live in the /weights volume (fetched on first start).

# The CUDA 12.8 "base" flavour: driver compatibility and the NVIDIA_* settings the container
# toolkit reads. torch's cu128 wheels bring the CUDA 12.8 runtime libraries they were built
# against (cuBLAS, cuDNN...), so a "runtime" flavour would only add a second, unused copy.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS builder
# Must name the same CUDA version as BASE_IMAGE; empty means "torch from the package index".
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA/Ubuntu bases have no Python; python:*-slim has one with venv. Versions come from the
# base image's own release, which BASE_IMAGE pins, so packages are not pinned again here.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The same recipe as `make install` (scripts/install.sh), without the editable install and
# the dev extra.
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY scripts/install.sh scripts/
COPY contract/ contract/
COPY client/ client/
COPY server/ server/
RUN PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" scripts/install.sh \
    && pip uninstall -y cython \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The interpreter the venv was made with, and on the CUDA image (nvidia/cuda sets CUDA_VERSION)
# a C compiler and Python's headers: torch.compile's Triton kernels are launched through a C
# module Triton builds at run time with them (pytorch/pytorch#116696). Without them
# --compile auto stays off and says why, at about half the speed on an H200. No pip caches.
# hadolint ignore=DL3008
RUN packages=(); \
    command -v python3 >/dev/null || packages+=(python3); \
    if [ -n "${CUDA_VERSION:-}" ]; then packages+=(gcc libc6-dev python3-dev); fi; \
    if [ "${#packages[@]}" -gt 0 ]; then \
        apt-get update && apt-get install -y --no-install-recommends "${packages[@]}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/gfpgan gfpgan \
    && mkdir -p /weights /cache/inductor && chown -R gfpgan:gfpgan /weights /cache

COPY --from=builder /opt/venv /opt/venv
# Executable in git (the mode is kept), so no BuildKit-only --chmod is needed.
COPY deploy/docker/healthcheck.py /usr/local/bin/gfpgan-healthcheck
COPY deploy/docker/fetch_weights.py /usr/local/bin/gfpgan-fetch-weights

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GFPGAN_HOST=0.0.0.0 \
    GFPGAN_PORT=50051 \
    GFPGAN_METRICS_PORT=9090 \
    GFPGAN_WEIGHTS_DIR=/weights \
    GFPGAN_MODEL=/weights/GFPGANv1.4.pth \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

USER 10001:10001
WORKDIR /home/gfpgan
VOLUME ["/weights"]
EXPOSE 50051 9090

# SERVING only after the model is loaded and warmed up; the first start also downloads about
# 0.5 GB of weights and, on a GPU, compiles the networks (torch.compile: about a minute the first
# time, seconds from the Inductor cache in /cache, a volume in compose), hence the long start
# period.
HEALTHCHECK --interval=15s --timeout=6s --start-period=10m --retries=3 CMD ["gfpgan-healthcheck"]

# SIGTERM starts the server's drain (--drain-grace-s, 30 s by default): give it time with
# `docker stop -t 40` / compose's stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gfpgan-serve"]
