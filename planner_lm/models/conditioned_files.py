"""What a saved conditioned LM folder holds, and the checks made before its weights are reused.

`ActionConditionedLM` writes ``conditioning_config.json`` and ``conditioning.safetensors`` (and
``base/`` when the base must travel with it). Reading such a folder back, for loading or for a warm
start, must refuse what would silently mean something else: a download (or a clone of a Hub
repository) that points its base at this machine's files, or weights trained for another base, k or
set of layers. Every check that needs only the folder runs before its base is fetched.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from planner_lm.errors import UserError
from planner_lm.model_files import PRESETS, Fetched, check_weights_cover_config, download, path_only
from planner_lm.models.adapters import CONFIG_RULES, FORMAT, FORMAT_VERSION, REQUIRED_KEYS
from planner_lm.models.base_lm import weights_fingerprint
from planner_lm.models.hub import check_shapes, header_shapes, read_config

CONFIG_FILE = "conditioning_config.json"
WEIGHTS_FILE = "conditioning.safetensors"
BASE_SUBDIR = "base"

WARM_START_MATCH: tuple[str, ...] = ("model_type", "conditioned_layers", "num_actions", "action_dim",
                                     "per_layer_codebook", "adapter_site", "base_mode", "lora_r",
                                     "lora_target_modules", "conditioning", "residual_rank")
"""Settings a warm start must share with the run it starts from (the weights' shapes and meaning)."""


def check_warm_start(save_dir: Path, settings: dict[str, Any], base_fingerprint: str) -> None:
    """Refuse to warm-start a model with ``settings`` over a base with ``base_fingerprint`` from the
    conditioned LM saved in ``save_dir`` unless its weights fit and were trained over the same base."""
    config_path = save_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{save_dir} holds no conditioned LM ({CONFIG_FILE} missing); finish that run first")
    config = json.loads(config_path.read_text())
    saved = {"conditioning": "paper", "residual_rank": 0, **config}  # folders saved before the residual design
    differ = [k for k in WARM_START_MATCH if saved.get(k) != settings[k]]
    if differ:
        details = ", ".join(f"{k} {saved.get(k)} vs {settings[k]}" for k in differ)
        raise UserError(f"cannot warm-start from {save_dir}: it differs in {details}; train it with the same "
                        "settings or drop --data.init_from")
    if config.get("base_saved") or settings["base_mode"] == "full":
        raise UserError(f"cannot warm-start from {save_dir}: warm starts carry adapters and codebooks over a "
                        "frozen (or LoRA) base, not fully fine-tuned base weights")
    if config.get("base_fingerprint") != base_fingerprint:
        raise UserError(f"cannot warm-start from {save_dir}: it was trained on another base LM "
                        f"({config.get('base')!r}); use a run of the same base")


def carried_base(folder: Path) -> list[str]:
    """The subfolder a download of a conditioned LM fetches after its top level: `base/` when the config says
    the base travels with it. The config and the weights' header are checked first, before the big download."""
    config = read_config(folder / CONFIG_FILE, CONFIG_RULES, REQUIRED_KEYS)
    check_config_shapes(folder / WEIGHTS_FILE, header_shapes(folder / WEIGHTS_FILE), config)
    return [BASE_SUBDIR] if config["base_saved"] else []


def check_config_shapes(path: Path, stated: dict[str, tuple[int, ...]], settings: dict[str, Any]) -> None:
    """Refuse weights whose tensor names, or any shape the config alone fixes, differ from the config's, before
    the base is fetched (the adapters' widths and LoRA shapes come from the base: checked once it is built)."""
    layers, num, dim = len(settings["conditioned_layers"]), settings["num_actions"], settings["action_dim"]
    books, rank = layers if settings["per_layer_codebook"] else 1, settings.get("residual_rank", 0)
    expected: dict[str, tuple[Any, ...]] = {"codebook": (books, num, dim)}
    if settings.get("conditioning") == "residual":
        expected["code_centre"] = (books, dim)
    if rank:
        expected["code_projection.weight"] = (rank, dim)
    for slot in range(layers):
        width = tuple(stated.get(f"adapters.{slot}.bias") or (None,))[:1]  # the base's: any, as long as it agrees
        expected[f"adapters.{slot}.weight"] = (*width, rank or dim)
        expected[f"adapters.{slot}.bias"] = width
    if settings["base_mode"] == "lora":
        expected.update({name: shape for name, shape in stated.items() if name.startswith("lora.")})
    check_shapes(path, stated, expected)


BASE_ONLY_HUB_OPTIONS = ("local_files_only", "cache_dir", "token")
"""The conditioned LM's download options its base's download shares (not its revision)."""


def base_location(source: Fetched, config: dict[str, Any], hub: dict[str, Any]) -> str:
    """Where the base LM of a saved conditioned LM lies; a Hub base is downloaded here, announced with why.

    A folder from the Hub (downloaded, a `git clone` or a cache snapshot: `source.untrusted`) may only carry
    its base (`base/`), point inside itself, or name a Hub model (fetched with the same safe files, offline
    switch and cache as the folder) or a preset: never a path on this machine."""
    save_dir = source.folder
    if config["base_saved"]:
        if source.untrusted:
            check_weights_cover_config(save_dir / BASE_SUBDIR, f"{save_dir / CONFIG_FILE}'s base")
        return str(save_dir / BASE_SUBDIR)
    relative, base = config.get("base_relative"), config["base"]
    if source.untrusted:
        inside = save_dir.resolve()
        if relative and inside not in (inside / relative).resolve().parents:
            raise UserError(f"{save_dir / CONFIG_FILE} points its base LM outside the downloaded folder "
                            f"(base_relative {relative!r}); refused: a download may only carry its base or name a Hub model")
        if relative and (save_dir / relative).is_dir():
            check_weights_cover_config(save_dir / relative, f"{save_dir / CONFIG_FILE}'s base")
            return str((save_dir / relative).resolve())
        if base not in PRESETS and path_only(base):
            raise UserError(f"{save_dir / CONFIG_FILE} names its base LM by a local path ({base!r}); refused: "
                            "a downloaded conditioned LM may only carry its base or name a Hub model or a preset")
    elif relative and (save_dir / relative).is_dir():
        return str((save_dir / relative).resolve())
    elif Path(base).expanduser().is_dir() or path_only(base):
        return base
    if base in PRESETS:
        return base
    why = (f"named as its base by conditioned LM {source.reference!r}, which does not carry it; "
           "pass base= to use a model you already have")
    return str(download(base, "base LM", why=why, required=[["config.json"], ["*.safetensors"]],
                        **{k: v for k, v in hub.items() if k in BASE_ONLY_HUB_OPTIONS}).folder)


def write_conditioned_lm(model: Any, save_dir: Path, tokenizer: Any, include_base: bool) -> None:
    """Write a conditioned LM's folder (see `ActionConditionedLM.save_pretrained`): its trained tensors, the
    JSON config naming its base (by reference and fingerprint, or carried in `base/`), and the tokenizer."""
    save_base = model.settings.base_mode == "full" or not model.base_reference or include_base
    reference = model.base_reference or ""
    relative = None
    if not save_base and Path(reference).is_dir():
        relative = os.path.relpath(Path(reference).resolve(), save_dir.resolve())
        reference = str(Path(reference).resolve())
    if save_base:
        base_dir = save_dir / BASE_SUBDIR
        # "full" mode with LoRA never happens, so the base has its original module names
        model.base.save_pretrained(base_dir)
    if not save_base and model._base_fingerprint is None:
        model._base_fingerprint = weights_fingerprint(model.base)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model._trained_state().items()}
    if model.settings.base_mode == "lora":
        for name, tensor in model.base.state_dict().items():
            if "lora_" in name:
                state[f"lora.{name}"] = tensor.detach().cpu().contiguous()
    save_file(state, str(save_dir / WEIGHTS_FILE))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": reference,
        "base_relative": relative,
        "base_saved": save_base,
        "base_fingerprint": None if save_base else model._base_fingerprint,
        **asdict(model.settings),
    }
    (save_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
