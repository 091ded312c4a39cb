"""A stand-in for the Hugging Face Hub that answers through huggingface_hub's own file matching.

Repositories are folders under `remote` (`remote / "owner/name"`); each distinct content is a commit
(its sha is the content's hash), so editing a repository publishes a new revision while the old one
stays downloadable. `HfApi.model_info`, `snapshot_download` and `try_to_load_from_cache` are replaced;
`snapshot_download` selects files with `huggingface_hub.utils.filter_repo_objects` (what the real one
calls), copies them into a cache laid out as the real one (`models--owner--name/snapshots/<sha>`,
`refs/main`) and records every file it transfers.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.remote, self.cache, self.commits = root / "remote", root / "hf-cache", root / "commits"
        for folder in (self.remote, self.cache, self.commits):
            folder.mkdir(parents=True, exist_ok=True)
        self.asked: list[str] = []  # repository ids asked of the Hub, in order
        self.transferred: list[str] = []  # "owner/name/path" of every file fetched
        self.requests: list[tuple[str, str | None]] = []  # (repository, revision) of every listing asked for

    def install(self, monkeypatch) -> "FakeHub":
        import huggingface_hub

        hub = self
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                            lambda self, repo_id, revision=None, **kw: hub.model_info(repo_id, revision))
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", self.try_to_load_from_cache)
        return self

    # ------------------------------------------------------------------ the Hub's side
    def commit(self, repo_id: str) -> str:
        """The current revision of `repo_id` (its content's hash), kept for later downloads."""
        source = self.remote / repo_id
        if not source.is_dir():
            import huggingface_hub

            raise huggingface_hub.errors.RepositoryNotFoundError(f"404: {repo_id} not found")
        digest = hashlib.sha1()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
        sha = digest.hexdigest()
        if not (self.commits / sha).is_dir():
            shutil.copytree(source, self.commits / sha)
        return sha

    def model_info(self, repo_id: str, revision: str | None) -> SimpleNamespace:
        self.asked.append(repo_id)
        self.requests.append((repo_id, revision))
        sha = revision if revision and (self.commits / revision).is_dir() else self.commit(repo_id)
        files = self.commits / sha
        siblings = [SimpleNamespace(rfilename=str(p.relative_to(files)), size=p.stat().st_size)
                    for p in sorted(files.rglob("*")) if p.is_file()]
        return SimpleNamespace(sha=sha, siblings=siblings)

    # ------------------------------------------------------------------ the client's side
    def folder(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str, sha: str | None = None) -> Path:
        """The cached snapshot of `repo_id` at `sha` (default: what `refs/main` names)."""
        sha = sha or (self.folder(repo_id) / "refs" / "main").read_text()
        return self.folder(repo_id) / "snapshots" / sha

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, ignore_patterns=None,
                          local_files_only=False, **kwargs) -> str:
        import huggingface_hub
        from huggingface_hub.utils import filter_repo_objects

        if local_files_only:
            self.asked.append(repo_id)
            ref = self.folder(repo_id) / "refs" / (revision or "main")
            sha = revision if revision and (self.folder(repo_id) / "snapshots" / revision).is_dir() else (
                ref.read_text() if ref.is_file() else None)
            if sha is None:
                raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache")
            return str(self.snapshot(repo_id, sha))
        sha = revision if revision and (self.commits / revision).is_dir() else self.commit(repo_id)
        source = self.commits / sha
        names = [str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()]
        target = self.folder(repo_id) / "snapshots" / sha
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, target / name)
            self.transferred.append(f"{repo_id}/{name}")
        target.mkdir(parents=True, exist_ok=True)
        (self.folder(repo_id) / "refs").mkdir(exist_ok=True)
        if revision is None or revision == "main" or sha == self.commit(repo_id):
            (self.folder(repo_id) / "refs" / "main").write_text(sha)
        return str(target)

    def try_to_load_from_cache(self, repo_id, filename, cache_dir=None, revision=None, **kwargs):
        path = self.folder(repo_id) / "snapshots" / (revision or "main") / filename
        return str(path) if path.is_file() else None
