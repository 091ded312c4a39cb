"""Base causal language models: loading by name (see `planner_lm.model_files`), architectures of
any size for training from scratch, and a weights fingerprint that ties a saved conditioned LM to
its base. Tokenizers live in `planner_lm.tokenization`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, PretrainedConfig, PreTrainedModel

from planner_lm.errors import UserError
from planner_lm.model_files import load_error, resolve_pretrained
from planner_lm.tokenization import GPT2_VOCAB_SIZE

__all__ = ["load_base_lm", "weights_fingerprint", "gpt2_config", "tiny_config"]


# ----------------------------------------------------------------------------- models
def load_base_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedModel:
    """Load a causal LM by name (local directory, preset or hub name; see module doc).

    The returned model's ``name_or_path`` is the string given here, so a conditioned LM saved
    on top of it refers to the base by that name (portable presets stay presets); a Hub name becomes
    ``owner/name@<commit>``, so that later loads get the very weights loaded now.
    """
    source, kwargs, reference = resolve_pretrained(name_or_path, cache_dir)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:  # a broken folder, an unknown architecture, code it would need to run
        raise load_error(name_or_path, "model", err) from err
    model.name_or_path = reference
    return model


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of a model's weights (names, shapes, dtypes, bytes), ignoring LoRA layers.

    Used to check that the base a saved conditioned LM refers to is still the same model.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.replace(".base_layer", "").encode())
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def gpt2_config(
    vocab_size: int = GPT2_VOCAB_SIZE,
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 128,
    dropout: float = 0.1,
    bos_token_id: int = GPT2_VOCAB_SIZE - 1,
    eos_token_id: int = GPT2_VOCAB_SIZE - 1,
) -> GPT2Config:
    """A GPT-2 architecture of any size (tied input/output embeddings, as GPT-2)."""
    if n_embd % n_head:
        raise UserError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    return GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


def tiny_config(model_type: str = "gpt2", vocab_size: int = 96, **overrides: Any) -> PretrainedConfig:
    """A few-thousand-parameter config of a model family, for tests (4 layers, 32 wide)."""
    if model_type == "gpt2":
        base = dict(n_layer=4, n_embd=32, n_head=2, n_positions=64)
    else:
        base = dict(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**base, **ids, **overrides})
