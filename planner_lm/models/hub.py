"""Hugging Face Hub hand-off for the planner and the conditioned LM: `save_pretrained`,
`from_pretrained` (a local folder or a Hub repository) and `push_to_hub`, through huggingface_hub's
`ModelHubMixin`.

Only JSON, safetensors and text files are ever written or fetched: a download is restricted to
`SAFE_PATTERNS`, so nothing that could be unpickled reaches the machine. Every saved folder
carries a model card (`README.md`); `planner_lm.publish` rewrites it with the run's facts and
results before a push.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelHubMixin

SAFE_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja"]
"""Files a download may fetch: configs, safetensors weights, cards, tokenizer vocabularies."""

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
    def local_folder(cls, model_id: str | os.PathLike, *, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                     local_files_only: bool = False, token: str | bool | None = None) -> Path:
        """`model_id` itself when it is a local folder, else a snapshot of the Hub repository holding
        only `SAFE_PATTERNS` files."""
        if Path(model_id).is_dir():
            return Path(model_id)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_id), revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only,
                                      token=token, allow_patterns=SAFE_PATTERNS))

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, **hub_kwargs):
        """Load from a local folder or a Hub repository id (`revision`, `cache_dir`, `token`, ...)."""
        return cls._load_folder(cls.local_folder(pretrained, **hub_kwargs))

    @classmethod
    def _load_folder(cls, folder: Path):
        raise NotImplementedError
