#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup-dev.sh), lints, checks formatting and types, then runs the
# whole suite against real parts (CPU vLLM engines, a local Ray cluster, a Docker engine, Prometheus); the unit
# tests run first (tests/conftest.py orders them), so a broken module fails in the first minute, not the last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
.venv/bin/ruff check services tests bench scripts
.venv/bin/ruff format --check services tests bench scripts
.venv/bin/mypy  # strict on services/ (pyproject.toml [tool.mypy])
# The appliance tests build images and run `docker compose` on a real engine (the slowest part); CI runs
# them. SVLLM_APPLIANCE_TESTS=0 leaves them out of a quick local run.
export SVLLM_APPLIANCE_TESTS="${SVLLM_APPLIANCE_TESTS:-1}"
# --no-loadscope-reorder: xdist would hand out the modules by their number of tests, not in the order
# tests/conftest.py gives them (unit tests first, then the longest end-to-end modules).
exec .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=30 -n 2 --dist loadfile --no-loadscope-reorder "$@"
