"""Tiny LoRA adapters for the tiny Llama (``testing/tiny_model.py``), made locally without ``peft``.

The folder holds what ``peft``'s ``save_pretrained`` writes and vLLM reads: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight``.
The weights are random from a seed: adapters with different seeds give different greedy outputs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .tiny_model import build_folder

_MARKER = ".tiny-lora-complete"

# The tiny model's shapes (testing/tiny_model.py): hidden 128, 2 query heads and 1 KV head of 64, 2 layers.
_HIDDEN = 128
_LAYERS = 2
_OUT = {"q_proj": 128, "v_proj": 64}


def _build(target: Path, base_model: str, rank: int, seed: int, hidden: int) -> None:
    # Imported here: only tests and benchmarks make adapters.
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(_LAYERS):
        for module, out in _OUT.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            # Large random weights on both factors (peft's init_lora_weights=False): the adapter changes the output.
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.5
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_model.safetensors").chmod(0o644)  # written private; readable as the model is
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(_OUT),
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (target / _MARKER).write_text("ok\n")


def make_tiny_lora(
    path: str | Path, *, base_model: str = "tiny", rank: int = 8, seed: int = 1, hidden: int = _HIDDEN
) -> Path:
    """Create an adapter at ``path`` (idempotent: a complete folder is left as it is).

    ``hidden`` other than the tiny model's makes an adapter for another base (its shapes do not fit).
    """
    return build_folder(path, _MARKER, lambda staging: _build(staging, base_model, rank, seed, hidden))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serverless_vllm.testing.tiny_lora DIR [RANK] [SEED]``: make an adapter, print its path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 3 or args[0] in ("-h", "--help"):
        print("usage: python -m serverless_vllm.testing.tiny_lora DIR [RANK] [SEED]", file=sys.stderr)
        return 2
    rank = int(args[1]) if len(args) > 1 else 8
    seed = int(args[2]) if len(args) > 2 else 1
    print(make_tiny_lora(args[0], rank=rank, seed=seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
