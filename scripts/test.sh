#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup-dev.sh), lints, then runs the whole suite against
# real parts (CPU vLLM engines, a local Ray cluster, a Docker engine, Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
.venv/bin/ruff check services tests bench
# The appliance tests build images and run `docker compose` on a real engine (the slowest part); CI runs
# them. SVLLM_APPLIANCE_TESTS=0 leaves them out of a quick local run.
export SVLLM_APPLIANCE_TESTS="${SVLLM_APPLIANCE_TESTS:-1}"
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
