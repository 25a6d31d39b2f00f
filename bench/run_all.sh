#!/usr/bin/env bash
# Every benchmark, one after the other; each waits (up to 40 minutes) for a quiet machine before measuring.
#   bash bench/run_all.sh            # full runs: results in bench/results/*.json
#   bash bench/run_all.sh --quick    # smoke runs (bench/results/*_quick.json)
set -uo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
PY=.venv/bin/python
Q=("$@")
$PY bench/hot_path.py --profile "${Q[@]}"
$PY bench/hot_path.py --fake-engine --extra-router asyncio --profile "${Q[@]}"
$PY bench/relay_client.py "${Q[@]}"
$PY bench/control_calls.py "${Q[@]}"
$PY bench/cold_start.py "${Q[@]}"
$PY bench/lora.py "${Q[@]}"
$PY bench/lora_fleet.py "${Q[@]}"
$PY bench/manager_scale.py "${Q[@]}"
$PY bench/router_scrape.py "${Q[@]}"
$PY bench/key_table.py "${Q[@]}"
$PY bench/router_instructions.py "${Q[@]}"
$PY bench/report.py
