# Serverless vLLM head: Ray head node + detached manager actor + router (Ray Serve app).
#
#   docker build -f docker/head.Dockerfile -t serverless-vllm/head:0.1.0 .
#
# Build context: the repository root (see .dockerignore). No vLLM in this image. Needs BuildKit (Docker 23+'s
# default builder, and `docker compose build`): the wheels are bind-mounted (RUN --mount).
#
# Offline / air-gapped builds: put wheels for every dependency in docker/wheelhouse/head/
# (or point WHEELHOUSE at another directory inside the context); when that directory holds
# wheels, pip installs with --no-index from it, otherwise from PyPI.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- requirements
# Only the requirement list (not the whole pyproject.toml) keys the dependency layer below, so
# editing tool settings or the version does not reinstall Ray.
FROM ${BASE_IMAGE} AS reqs
COPY docker/reqs.py pyproject.toml /src/
RUN python3 /src/reqs.py /src/pyproject.toml ray > /requirements.txt

# ---------------------------------------------------------------- wheels
# The wheelhouse in a stage of its own, bind-mounted where it is installed (below): no layer holds the wheels, and
# the installed dependencies are written once (a builder stage's venv would be copied into the image again).
FROM scratch AS wheels
ARG WHEELHOUSE=docker/wheelhouse/head
COPY ${WHEELHOUSE}/ /wheels/

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

ARG SVLLM_VERSION=0.1.0
LABEL org.opencontainers.image.title="serverless-vllm-head" \
      org.opencontainers.image.description="Serverless vLLM head: Ray head, manager actor, router (Ray Serve)" \
      org.opencontainers.image.version="${SVLLM_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN set -eu; \
    groupadd --system --gid 1000 svllm; \
    useradd --no-log-init --uid 1000 --gid svllm --create-home --home-dir /home/svllm --shell /usr/sbin/nologin svllm; \
    install -d -o svllm -g svllm /data

ARG RAY_VERSION=2.60.0
ARG PIP_EXTRA_ARGS=
ARG UV_VERSION=0.13.9

# Dependencies in one layer that only a change of requirements rebuilds; our package in a small one on top.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    --mount=type=bind,from=reqs,source=/requirements.txt,target=/src/requirements.txt \
    set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then src="--no-index --find-links /wheels"; else src=""; fi; \
    python3 -m venv /opt/venv; \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 /opt/venv/bin/pip install $src "uv==${UV_VERSION}"; \
    export UV_NO_CACHE=1 VIRTUAL_ENV=/opt/venv; \
    /opt/venv/bin/uv pip install --compile-bytecode \
        $src $PIP_EXTRA_ARGS -r /src/requirements.txt "ray[serve]==${RAY_VERSION}" "setuptools>=68" wheel; \
    /opt/venv/bin/uv pip uninstall uv
COPY pyproject.toml README* /src/
COPY services/ /src/services/
RUN set -eu; \
    /opt/venv/bin/pip install --no-deps --no-build-isolation /src; \
    rm -rf /src; \
    /opt/venv/bin/python -c "import serverless_vllm, ray.serve"
COPY docker/register_default_model.py /usr/local/bin/svllm-register-default

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/svllm \
    MANAGER_DB=/data/manager.db \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_DISABLE_DOCKER_CPU_WARNING=1

USER svllm
WORKDIR /home/svllm
# 8000: router (OpenAI API, /health, /metrics, /workers/*); 8265: Ray dashboard; 6379: Ray GCS.
EXPOSE 8000 8265 6379

HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=6 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["svllm"]
CMD ["ray-services", "--host", "0.0.0.0", "--port", "8000", "--dashboard-host", "0.0.0.0"]
