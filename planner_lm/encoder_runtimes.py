"""The sentence encoder's network on ONNX Runtime or OpenVINO (optional extras), exported once and cached.

`RuntimeEncoder` keeps the sentence-transformers model for what is cheap (tokenization, the
encoder's metadata) and runs the network (transformer + pooling + normalisation, one graph) in
the runtime. The graph is exported from the loaded model with `torch.onnx.export` the first time
a model folder is used and cached under ``<planner_lm cache>/encoders/<key>/`` (``key`` hashes the
model folder's files and the torch version), so it works offline and a later
stage reuses the very same file. ``quantize=True`` (ONNX Runtime only) adds int8 dynamic
quantization of the weight matrices (`onnxruntime.quantization.quantize_dynamic`).

Why not sentence-transformers' own `backend="onnx"|"openvino"`: those load through `optimum-onnx`
/ `optimum-intel`, whose releases pin transformers < 4.58 / < 5.6, older than this project's
transformers; the runtimes themselves (`onnxruntime`, `openvino`) have no such pins.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from planner_lm.errors import UserError

RUNTIME_BACKENDS = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
"""Backend name -> the modules it needs (installed by the extra of the same name); `onnx` is what
`torch.onnx.export` writes the graph with."""

EXPORT_FORMAT = 1  # bump when the exported graph changes, so stale cache entries are not reused
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _missing(backend: str) -> list[str]:
    return [module for module in RUNTIME_BACKENDS[backend] if importlib.util.find_spec(module) is None]


def runtime_available(backend: str) -> bool:
    """Whether everything `backend` needs can be imported here."""
    return backend in RUNTIME_BACKENDS and not _missing(backend)


def require_runtime(backend: str, quantize: bool = False) -> None:
    """A one-line UserError when `backend` (or int8 quantization with it) cannot run here."""
    if backend not in RUNTIME_BACKENDS:
        raise UserError(f"unknown embed backend {backend!r}; choose auto, torch, {', '.join(RUNTIME_BACKENDS)}")
    if quantize and backend != "onnx":
        raise UserError(f"int8 quantization (model.quantize) is available with backend onnx only, not {backend!r}")
    if not runtime_available(backend):
        missing = _missing(backend) or list(RUNTIME_BACKENDS[backend])
        raise UserError(f"embed backend {backend!r} needs the package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(m) for m in missing)}; install them with `pip install -e '.[{backend}]'` "
                        f"or use --model.backend torch")


def cache_root() -> Path:
    from planner_lm.model_files import default_cache_dir

    return default_cache_dir() / "encoders"


def export_key(location: str) -> str:
    """Cache key of one model folder (or hub name): its files' names and contents, and torch's version.

    Content, not path: a copied or re-created identical folder reuses the export, and a changed
    file never does (hashing MiniLM's 90 MB takes about 0.2 s)."""
    path = Path(location)
    digest = hashlib.sha256(json.dumps({"torch": torch.__version__.split("+")[0], "format": EXPORT_FORMAT}).encode())
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path)
            if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                digest.update(str(relative).encode() + b"\0")
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
    else:
        digest.update(location.encode())
    return digest.hexdigest()[:16]


class _SentenceGraph(torch.nn.Module):
    """The whole sentence-transformers network (no tokenizer) as a module of positional tensors."""

    def __init__(self, model: Any, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(dict(zip(self.names, tensors)))["sentence_embedding"]


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_onnx(model: Any, location: str, names: Sequence[str], cache_dir: Path | None = None) -> Path:
    """`model.onnx` of this sentence-transformers model (exported now unless cached)."""
    folder = (cache_dir or cache_root()) / export_key(location)
    target = folder / "model.onnx"
    if target.is_file():
        return target
    print(f"embed: exporting the sentence encoder to ONNX (once) -> {target}", file=sys.stderr)
    probe = model.preprocess(["an example sentence for the export", "and a second one"]) \
        if hasattr(model, "preprocess") else model.tokenize(["an example sentence for the export", "and a second one"])
    args = tuple(probe[name] for name in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in names} | {"sentence_embedding": {0: "batch"}}
    graph = _SentenceGraph(model, names).eval()

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            torch.onnx.export(graph, args, tmp, dynamo=False, input_names=list(names),
                              output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=17)

    try:
        _atomic_write(target, write)
    except Exception as err:  # noqa: BLE001 - exporter errors come in many types
        first_line = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise UserError(f"cannot export the sentence encoder {location!r} to ONNX ({first_line}); "
                        f"use --model.backend torch") from err
    (folder / "source.json").write_text(json.dumps({"location": location, "inputs": list(names)}) + "\n")
    return target


def down_projections(path: Path) -> list[str]:
    """MatMul nodes whose weight is taller than wide: the feed-forward output matrices.

    Their input is the wide post-GELU activation, whose long tail int8 (one scale per row) cuts
    badly: quantizing them too drops all-MiniLM-L6-v2's mean cosine to fp32 from 0.996 to 0.993.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "MatMul" and len(node.input) > 1
            and len(shapes.get(node.input[1], ())) == 2 and shapes[node.input[1]][0] > shapes[node.input[1]][1]]


def quantized_onnx(path: Path) -> Path:
    """int8 dynamic quantization of an exported graph's weight matrices (cached next to it).

    Per-channel int8 weights, activations quantized on the fly; matrix products of two
    activations (attention scores) and the feed-forward down-projections stay fp32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = path.with_name(f"model_int8_v{EXPORT_FORMAT}.onnx")
    if not target.is_file():
        print(f"embed: quantizing the ONNX encoder to int8 (once) -> {target}", file=sys.stderr)
        _atomic_write(target, lambda tmp: quantize_dynamic(
            str(path), tmp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=down_projections(path), extra_options={"MatMulConstBOnly": True}))
    return target


class RuntimeEncoder:
    """A sentence-transformers model whose network runs in ONNX Runtime or OpenVINO.

    Quacks like the `SentenceTransformer` as `encode_batch` and the embed stage use it:
    `preprocess`/`tokenize`, `tokenizer`, `max_seq_length`, `get_sentence_embedding_dimension`,
    and calling it on tokenized features returns ``{"sentence_embedding": float32 tensor}``.
    The session is built on first use with `torch.get_num_threads()` threads; OpenVINO computes in
    bf16 only where `precision` asks for it (the Trainer's, as the torch backend would).
    """

    def __init__(self, model: Any, location: str, backend: str, quantize: bool = False,
                 precision: str = "32-true", cache_dir: Path | None = None) -> None:
        require_runtime(backend, quantize)
        self.model, self.backend, self.quantize, self.precision = model, backend, quantize, precision
        probe = self.preprocess(["probe"])
        self.input_names = [name for name in _INPUTS if name in probe]
        path = export_onnx(model, location, self.input_names, cache_dir)
        self.path = quantized_onnx(path) if quantize else path
        self._run = None

    # --- what the rest of the pipeline reads from a SentenceTransformer
    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.model.max_seq_length = value

    def preprocess(self, texts: list[str]) -> dict[str, Any]:
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        return prepare(texts)

    def get_sentence_embedding_dimension(self) -> int | None:
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return dimension()

    def set_precision(self, precision: str) -> None:
        if precision != self.precision:
            self.precision, self._run = precision, None

    def eval(self) -> "RuntimeEncoder":
        return self

    def requires_grad_(self, flag: bool = True) -> "RuntimeEncoder":
        return self

    @property
    def description(self) -> str:
        if self.backend == "onnx":
            return "onnxruntime " + ("int8 dynamic" if self.quantize else "fp32")
        return "openvino " + ("bf16" if "bf16" in self.precision else "fp32")

    # --- the network
    def _session(self):
        threads = max(1, torch.get_num_threads())
        if self.backend == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.log_severity_level = 3
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            return lambda feed: session.run(None, feed)[0]
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if "bf16" in self.precision else "f32"}
        request = ov.Core().compile_model(str(self.path), "CPU", config).create_infer_request()
        return lambda feed: next(iter(request.infer(feed).values()))

    def __call__(self, features: Mapping[str, Any]) -> dict[str, Tensor]:
        if self._run is None:
            self._run = self._session()
        feed = {name: np.ascontiguousarray(features[name].cpu().numpy(), dtype=np.int64) for name in self.input_names}
        vectors = np.asarray(self._run(feed), dtype=np.float32)
        return {"sentence_embedding": torch.from_numpy(vectors)}
