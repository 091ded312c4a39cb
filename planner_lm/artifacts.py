"""Stage hand-offs: each stage directory ends with a `manifest.json`, written last and atomically.

A manifest records what a stage consumed (upstream directories and their manifest hashes), its
resolved config, the files it produced, facts downstream stages rely on (`num_actions`,
`embedding_dim`, ...), metrics, the seed and package versions. Downstream stages read facts from
here, never from the user, and refuse incomplete or mismatched inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from planner_lm.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

MAKE_TARGETS: dict[str, str] = {
    "prepare": "prepare", "embed": "embed", "cluster": "cluster", "pretrain_lm": "pretrain-lm",
    "pretrain_planner": "pretrain-planner", "finetune_joint": "finetune-joint", "evaluate": "evaluate",
}
"""stage name -> the make target that builds it (named in error messages); directories: `run_folder`."""

_VERSIONED_PACKAGES = (
    "torch", "lightning", "transformers", "datasets", "sentence-transformers", "faiss-cpu",
    "faiss-gpu", "numpy", "nupunkt", "planner-lm",
)


def make_target(stage: str) -> str:
    return MAKE_TARGETS.get(stage, stage)


def rerun(target: str) -> str:
    """How to (re)build a stage, for a checkout (make) and for a pip install (the same command name)."""
    return f"`make {target}` (pip install: `planner-lm {target} --run_dir ...`)"


# ----------------------------------------------------------------------------- atomic writes
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_replace(path: Path, write: Any, mode: str = "wb") -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes private files; outputs are ordinary files
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_replace(Path(path), lambda h: h.write(text), mode="w")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    _atomic_replace(Path(path), lambda h: np.save(h, array, allow_pickle=False))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    _atomic_replace(Path(path), lambda h: torch.save(obj, h))


def list_files(folder: str | os.PathLike) -> list[str]:
    """Every file and link under `folder` (links not followed), as sorted relative POSIX paths."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in [*files, *(d for d in dirs if (base / d).is_symlink())]:
            found.append((base / name).relative_to(folder).as_posix())
    return sorted(found)


# ----------------------------------------------------------------------------- manifests
def _jsonable(value: Any) -> Any:
    """Make configs (Namespaces, Paths, numpy scalars) JSON-serialisable."""
    if isinstance(value, Mapping) or callable(getattr(value, "items", None)):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return _jsonable(value.as_dict())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def config_hash(config: Any) -> str:
    """Hash of a resolved config, ignoring keys that do not change the result."""
    cfg = _jsonable(config)
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k not in _CONFIG_KEYS_NOT_HASHED}
    blob = json.dumps(cfg, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# keys that may differ between a run and its resume without changing the outputs
_CONFIG_KEYS_NOT_HASHED = {"overwrite", "config", "run_dir", "progress", "checkpoint_every_n_steps",
                           "checkpoint_every_minutes"}


def _describe_output(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if path.is_dir():
        info["kind"] = "dir"
        info["bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        info["kind"] = "file"
        info["bytes"] = path.stat().st_size
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
            info["shape"] = list(arr.shape)
            info["dtype"] = str(arr.dtype)
    return info


def write_manifest(
    stage_dir: str | os.PathLike,
    *,
    stage: str,
    config: Any,
    inputs: Mapping[str, str | os.PathLike] | None = None,
    outputs: list[str] | tuple[str, ...] = (),
    facts: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` last: every listed output must already exist.

    `inputs` maps a name to an upstream stage directory; its manifest hash is recorded so a
    later stage can tell whether its inputs were rebuilt since.
    """
    stage_dir = Path(stage_dir)
    described: dict[str, Any] = {}
    for rel in outputs:
        path = stage_dir / rel
        if not path.exists():
            raise FileNotFoundError(f"stage {stage}: output {path} missing; refusing to write the manifest")
        described[rel] = _describe_output(path)
    from planner_lm.ownership import written_files  # (ownership builds on this module)

    recorded_inputs = {}
    for name, upstream in (inputs or {}).items():
        upstream = Path(upstream)
        recorded_inputs[name] = {"path": str(upstream), "manifest_hash": manifest_hash(upstream)}
    manifest = {
        "stage": stage,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": _jsonable(config),
        "config_hash": config_hash(config),
        "inputs": recorded_inputs,
        "outputs": described,
        "files": written_files(stage_dir),  # everything the stage wrote: what `make clean` may delete
        "facts": _jsonable(dict(facts or {})),
        "metrics": _jsonable(dict(metrics or {})),
        "seed": seed,
        "versions": package_versions(),
        "host": platform.node(),
    }
    atomic_write_text(stage_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def manifest_hash(stage_dir: str | os.PathLike) -> str | None:
    """SHA-256 (first 16 hex digits) of a stage's manifest file, or None if there is none."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class Manifest:
    """A validated manifest of a finished stage."""

    path: Path
    data: dict[str, Any] = field(repr=False)

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def stage(self) -> str:
        return self.data["stage"]

    @property
    def facts(self) -> dict[str, Any]:
        return self.data.get("facts", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data.get("metrics", {})

    @property
    def config(self) -> dict[str, Any]:
        return self.data.get("config", {})

    @property
    def outputs(self) -> dict[str, Any]:
        return self.data.get("outputs", {})

    @property
    def inputs(self) -> dict[str, Any]:
        return self.data.get("inputs", {})

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def fact(self, key: str) -> Any:
        if key not in self.facts:
            raise UserError(
                f"{self.path} has no fact '{key}'; it was written by an older or different stage: "
                f"re-run {rerun(make_target(self.stage))}"
            )
        return self.facts[key]

    def require(self, key: str, expected: Any, what: str = "") -> None:
        """Raise a one-sentence UserError when fact `key` differs from `expected`."""
        actual = self.fact(key)
        if actual != expected:
            context = f" ({what})" if what else ""
            raise UserError(
                f"mismatched artefacts{context}: {self.dir} has {key}={actual!r} but {expected!r} was "
                f"expected; re-run {rerun(make_target(self.stage))} or point to matching directories"
            )

    def check_built_from(self, name: str, upstream: Manifest) -> None:
        """Refuse a manifest whose recorded input `name` is not the current `upstream`."""
        recorded = self.inputs.get(name, {}).get("manifest_hash")
        if recorded is not None and recorded != upstream.hash:
            raise UserError(
                f"{self.dir} was built from an older {upstream.dir} (it has changed since); "
                f"re-run {rerun(make_target(self.stage))}"
            )


def _check_recorded_shape(path: Path, info: dict[str, Any], target: str) -> None:
    """An array replaced or truncated after its stage finished is refused (read from the header only)."""
    if "shape" not in info or path.suffix != ".npy":
        return
    try:
        array = np.load(path, mmap_mode="r")
        found = (list(array.shape), str(array.dtype))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); re-run {rerun(target)}") from err
    if found != (info["shape"], info.get("dtype", found[1])):
        raise UserError(f"{path} is {found[1]} {found[0]} but its manifest recorded {info.get('dtype')} "
                        f"{info['shape']}: it changed after the stage finished; re-run {rerun(target)}")


def read_manifest(stage_dir: str | os.PathLike, stage: str | None = None) -> Manifest:
    """Load and validate a finished stage's manifest, or explain which target to run."""
    stage_dir = Path(stage_dir)
    target = make_target(stage) if stage else "the upstream stage"
    path = stage_dir / MANIFEST
    if not stage_dir.is_dir():
        raise UserError(f"{stage_dir} does not exist; run {rerun(target)} first")
    if not path.is_file():
        raise UserError(
            f"{stage_dir} has no {MANIFEST}: the stage did not finish (interrupted or failed); "
            f"run {rerun(target)} to complete it"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err}); run {rerun(target)} again") from err
    if stage is not None and data.get("stage") != stage:
        raise UserError(f"{stage_dir} holds stage '{data.get('stage')}', not '{stage}'; check the path")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema version {data.get('schema_version')}, this planner-lm writes "
            f"{SCHEMA_VERSION}; re-run {rerun(target)}"
        )
    for rel, info in data.get("outputs", {}).items():
        if not (stage_dir / rel).exists():
            raise UserError(f"{stage_dir} is incomplete: {rel} is missing; re-run {rerun(target)}")
        _check_recorded_shape(stage_dir / rel, info, target)
    return Manifest(path=path, data=data)
