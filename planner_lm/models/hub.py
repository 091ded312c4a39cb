"""Hugging Face Hub hand-off for the planner and the conditioned LM: `save_pretrained`,
`from_pretrained` (a local folder or a Hub repository) and `push_to_hub`, through huggingface_hub's
`ModelHubMixin`.

Only JSON, safetensors and text files are ever written or fetched: a download is restricted to the
repository's top-level `SAFE_PATTERNS` files (`planner_lm.model_files.download`), so nothing that
could be unpickled reaches the machine. A config read back is checked key by key against its `ConfigRules` (known keys, types,
sizes within stated bounds) and against the shapes the safetensors header states before any module
is built, so a hostile folder cannot make a loader allocate more than its own weights file holds.
Every saved folder carries a model card (`README.md`); `planner_lm.publish` rewrites it with the
run's facts and results before a push.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelHubMixin

from planner_lm.errors import UserError
from planner_lm.model_files import SAFE_PATTERNS, Fetched, fetch

__all__ = ["SAFE_PATTERNS", "HUB_SETTINGS", "HubArtefact", "Rule", "ConfigRules", "read_config", "integer", "number",
           "one_of", "flag", "text", "optional", "list_of", "text_map", "header_shapes", "check_shapes"]

CARD_TEMPLATE = """---
{{ card_data }}
---

{{ body | default("A planner-lm artefact: a sentence-level planner or an action-conditioned LM. `python -m planner_lm.publish` writes the full card (base LM, encoder, codebook, corpus, protocol, results).", true) }}
"""

HUB_SETTINGS = dict(library_name="planner-lm", tags=["planner-lm", "text-generation", "sentence-planning"],
                    model_card_template=CARD_TEMPLATE, license="apache-2.0")
"""Class keywords of every Hub-ready module (`class X(nn.Module, HubArtefact, **HUB_SETTINGS)`)."""


class HubArtefact(ModelHubMixin):
    """Shared Hub plumbing: the mixin's `save_pretrained` / `push_to_hub` and model card, and a
    `from_pretrained` that reads only `SAFE_PATTERNS` files. Subclasses write their files in
    `_save_pretrained` and read a local folder in `_load_folder`."""

    @classmethod
    def fetch(cls, model_id: str | os.PathLike, *, subfolders: Callable[[Path], list[str]] | None = None,
              revision: str | None = None, cache_dir: str | os.PathLike | None = None, force_download: bool = False,
              local_files_only: bool = False, token: str | bool | None = None) -> Fetched:
        """`model_id` itself when it is a local folder, else a snapshot of the Hub repository holding only
        its top-level `SAFE_PATTERNS` files and those of the `subfolders` its checked top level names (a
        missing path is an error, never a Hub id; see `model_files.download`), with whether its contents
        are the Hub's (downloaded, cloned or cached)."""
        return fetch(model_id, cls.__name__, subfolders=subfolders, revision=revision, cache_dir=cache_dir,
                     force_download=force_download, local_files_only=local_files_only, token=token)

    @classmethod
    def local_folder(cls, model_id: str | os.PathLike, **hub_kwargs) -> Path:
        """The folder `fetch` finds for `model_id`."""
        return cls.fetch(model_id, **hub_kwargs).folder

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, **hub_kwargs):
        """Load from a local folder or a Hub repository id (`revision`, `cache_dir`, `token`, ...)."""
        return cls._load_folder(cls.local_folder(pretrained, **hub_kwargs))

    @classmethod
    def _load_folder(cls, folder: Path):
        raise NotImplementedError


# ----------------------------------------------------------------------------- reading configs back
@dataclass(frozen=True)
class Rule:
    """What one config value may be: `check(value)` says whether it is, `says` describes it in errors."""

    check: Callable[[Any], bool]
    says: str


def integer(low: int, high: int) -> Rule:
    return Rule(lambda v: type(v) is int and low <= v <= high, f"an integer in [{low}, {high}]")


def number(low: float, high: float) -> Rule:
    return Rule(lambda v: type(v) in (int, float) and math.isfinite(v) and low <= v <= high,
                f"a number in [{low}, {high}]")


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: any(type(v) is type(c) and v == c for c in choices), f"one of {', '.join(map(repr, choices))}")


def flag() -> Rule:
    return Rule(lambda v: type(v) is bool, "true or false")


def text(max_chars: int = 4096) -> Rule:
    return Rule(lambda v: type(v) is str and len(v) <= max_chars, f"a string of at most {max_chars} characters")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.check(v), f"null or {rule.says}")


def list_of(rule: Rule, max_items: int) -> Rule:
    return Rule(lambda v: type(v) is list and len(v) <= max_items and all(rule.check(x) for x in v),
                f"a list of at most {max_items} items, each {rule.says}")


def text_map(max_items: int = 64) -> Rule:
    return Rule(lambda v: type(v) is dict and len(v) <= max_items and all(
        type(k) is str and type(x) is str and len(k) + len(x) <= 8192 for k, x in v.items()),
        f"an object of at most {max_items} string entries")


ConfigRules = Mapping[str, Rule]
"""Every key a config may hold and what its value may be; keys missing from the file take defaults
(the loader's constructor says which are required)."""


def read_config(path: Path, rules: ConfigRules, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON config checked against `rules` before anything is built from it: an unreadable file,
    an unknown key, a missing required key or a value of the wrong kind or size is one `UserError`."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err}); re-save or re-download it") from err
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(config).__name__}")
    unknown = sorted(set(config) - set(rules))
    if unknown:
        raise UserError(f"{path} has keys this planner-lm does not know ({', '.join(map(repr, unknown[:5]))}); "
                        "nothing is built from it: use a folder written by planner-lm's save_pretrained")
    missing = [key for key in required if key not in config]
    if missing:
        raise UserError(f"{path} lacks {', '.join(map(repr, missing))}; use a folder written by planner-lm")
    for key, value in config.items():
        if not rules[key].check(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{path}: {key!r} must be {rules[key].says}, found {shown}; nothing is built from it")
    return config


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes stated by a safetensors file, read from its header (no tensor is loaded;
    the library checks that the header's offsets cover exactly the file's bytes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (OSError, SafetensorError) as err:  # missing, truncated or not safetensors
        raise UserError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); re-save or re-download it") from err


def check_shapes(path: Path, stated: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse weights whose names or shapes differ from those of the module the config describes."""
    if dict(stated) != dict(expected):
        odd = sorted(set(stated) ^ set(expected)) or [k for k in expected if stated[k] != expected[k]]
        name = odd[0]
        raise UserError(f"{path} does not match its config (tensor {name!r}: file {stated.get(name)}, config "
                        f"{expected.get(name)}); re-save or re-download the folder")
