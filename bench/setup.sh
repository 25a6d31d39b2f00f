#!/usr/bin/env bash
# What the benchmarks need besides the project's .venv (vLLM CPU, Ray, httpx; see scripts/test.sh):
#  - hey and wrk, HTTP load generators, and valgrind (router_instructions.py), from Debian's packages;
#  - the Rust vLLM router (PyPI `vllm-router`) in a venv of its own, bench/.venv-router;
#  - py-spy in the project's .venv (hot_path.py --profile).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v hey >/dev/null || ! command -v wrk >/dev/null || ! command -v callgrind_control >/dev/null; then
  apt-get install -y hey wrk valgrind >/dev/null
fi
if [ ! -x .venv-router/bin/vllm-router ]; then
  python3 -m venv .venv-router
  .venv-router/bin/pip install -q vllm-router
fi
if [ ! -x ../.venv/bin/py-spy ]; then
  ../.venv/bin/pip install -q py-spy
fi
echo "hey: $(command -v hey)  wrk: $(command -v wrk)  vllm-router: $(.venv-router/bin/pip show vllm-router 2>/dev/null | grep Version)"
