# syntax=docker/dockerfile:1
# qarvd: API server (`qarvd serve`, the default) and quantization worker (`qarvd worker`) in one image.
#
#   docker build -t qarvd:cuda .                          # CUDA 12.8 runtime, torch cu128 wheels
#   docker build -t qarvd:cpu --build-arg VARIANT=cpu .   # python:3.11-slim, torch CPU wheels
#
# Stages: base-<variant> (Python 3.11 + an empty venv) -> torch-<variant> (pinned torch)
# -> builder (`pip install ".[serve,wan]"`: the server's dependencies and those of Wan model cards,
# no dev extras) -> runtime (the venv, a non-root user). Only the stages of the chosen VARIANT are
# built (BuildKit).
ARG VARIANT=cuda

# ---- bases: Python 3.11 and a venv at /opt/venv -------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04 ships Python 3.12; the project targets 3.11 (deadsnakes PPA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

FROM python:3.11-slim AS base-cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- torch, pinned, from the PyTorch index of the variant ---------------------------------
FROM base-cuda AS torch-cuda
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

FROM base-cpu AS torch-cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# ---- the package: runtime dependencies only (no [dev], no [bench]) ------------------------
FROM torch-${VARIANT} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qarvd_core ./qarvd_core
COPY service ./service
# The shipped weights (qarvd_core/weights/NAME.safetensors + NAME.json) are package data:
# without them the default model cannot load and /readyz never turns 200.
ARG REQUIRE_WEIGHTS=1
RUN if [ "$REQUIRE_WEIGHTS" = "1" ] && ! ls qarvd_core/weights/*.safetensors >/dev/null 2>&1; then \
      echo "qarvd_core/weights/ has no .safetensors: train the shipped model first, or build with --build-arg REQUIRE_WEIGHTS=0" >&2; \
      exit 1; \
    fi
# torch is already satisfied, so pip keeps the pinned build instead of pulling another. [wan] brings
# diffusers (Wan's VAE) and transformers (the UMT5 text encoder), which Wan model cards load.
RUN pip install ".[serve,wan]" \
 && python -c "import torch, qarvd_core, service.main, diffusers, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# ---- runtime -------------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
RUN groupadd --gid 10001 qarvd \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/qarvd --shell /usr/sbin/nologin qarvd \
 && mkdir -p /data/artifacts /data/qarvd \
 && chown -R 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    QARVD_ARTIFACT_DIR=/data/artifacts \
    QARVD_DATA_DIR=/data/qarvd
WORKDIR /home/qarvd
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
# Liveness of the API process (readiness, a loaded and warmed model, is /readyz).
# The worker has no HTTP port: docker-compose.yml gives it its own check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# SIGTERM: the server closes open streams with 1012 (service restart), uvicorn waits up to 5 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["qarvd"]
CMD ["serve", "--host", "0.0.0.0"]
