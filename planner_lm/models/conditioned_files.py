"""What a saved conditioned LM folder holds, and the checks made before its weights are reused.

`ActionConditionedLM` writes ``conditioning_config.json`` and ``conditioning.safetensors`` (and
``base/`` when the base must travel with it). Reading such a folder back, for loading or for a warm
start, must refuse what would silently mean something else: a download that points its base at this
machine's files, or weights trained for another base, k or set of layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner_lm.errors import UserError
from planner_lm.model_files import PRESETS, check_weights_cover_config, path_only

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


def base_location(save_dir: Path, config: dict[str, Any], downloaded: bool) -> str:
    """Where the base LM of a saved conditioned LM lies. A downloaded folder may only carry its base
    (`base/`), point inside itself, or name a Hub model (fetched with the same safe file patterns)
    or a preset: never a path on this machine."""
    if config["base_saved"]:
        if downloaded:
            check_weights_cover_config(save_dir / BASE_SUBDIR, f"{save_dir / CONFIG_FILE}'s base")
        return str(save_dir / BASE_SUBDIR)
    relative = config.get("base_relative")
    if downloaded:
        inside = save_dir.resolve()
        if relative and inside not in (inside / relative).resolve().parents:
            raise UserError(f"{save_dir / CONFIG_FILE} points its base LM outside the downloaded folder "
                            f"(base_relative {relative!r}); refused: a download may only carry its base or name a Hub model")
        if relative and (save_dir / relative).is_dir():
            return str((save_dir / relative).resolve())
        if config["base"] not in PRESETS and path_only(config["base"]):
            raise UserError(f"{save_dir / CONFIG_FILE} names its base LM by a local path ({config['base']!r}); refused: "
                            "a downloaded conditioned LM may only carry its base or name a Hub model or a preset")
        return config["base"]
    if relative and (save_dir / relative).is_dir():
        return str((save_dir / relative).resolve())
    return config["base"]
