#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup-dev.sh), lints, checks formatting and types, then runs the
# whole suite against real parts (CPU vLLM engines, a local Ray cluster, a Docker engine, Prometheus); the unit
# tests run first (tests/conftest.py orders them), so a broken module fails in the first minute, not the last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-dev.sh
# The appliance tests build images and run `docker compose` on a real engine (the slowest part); CI runs
# them. SVLLM_APPLIANCE_TESTS=0 leaves them out of a quick local run.
export SVLLM_APPLIANCE_TESTS="${SVLLM_APPLIANCE_TESTS:-1}"
if [ "$SVLLM_APPLIANCE_TESTS" = 1 ] && [ $# -eq 0 ]; then
  # For the whole suite, their images are built ahead, in the background, while the linters and the other tests
  # run (tests/appliance/harness.py, `images`): on a fresh machine that is minutes of dockerd's work, which then
  # fills the time the tests leave idle instead of holding up one pytest process. The lock is taken here and held
  # by the build's process alone (fd 9, closed in this shell below); the appliance's fixture waits for it.
  export SVLLM_APPLIANCE_BUILD_LOCK="${TMPDIR:-/tmp}/svllm-appliance-images.lock"
  export SVLLM_APPLIANCE_BUILD_LOG="${TMPDIR:-/tmp}/svllm-appliance-images.log"
  exec 9>>"$SVLLM_APPLIANCE_BUILD_LOCK"
  flock 9
  nice -n 10 .venv/bin/python tests/appliance/harness.py images >"$SVLLM_APPLIANCE_BUILD_LOG" 2>&1 &
  exec 9>&-
fi
.venv/bin/ruff check services tests bench scripts
.venv/bin/ruff format --check services tests bench scripts
.venv/bin/mypy  # strict on services/ (pyproject.toml [tool.mypy])
# --no-loadscope-reorder: xdist would hand out the modules by their number of tests, not in the order
# tests/conftest.py gives them (unit tests first, then the longest end-to-end modules).
exec .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=30 -n 2 --dist loadfile --no-loadscope-reorder "$@"
