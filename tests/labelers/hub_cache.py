"""A Hugging Face hub cache written by hand, in huggingface_hub's own layout, so that the real
``snapshot_download`` and ``from_pretrained`` find a hub repository at a commit without a network.

The layout (huggingface_hub's cache docs): ``models--<owner>--<name>/`` holds ``blobs/<etag>``
(the hub's hash of each file: sha256 for LFS files, git's blob id for the rest),
``snapshots/<commit>/<path>``, links to those blobs, and ``refs/main``, the commit ``main`` names.
With ``HF_HUB_OFFLINE`` set, a commit found under ``snapshots/`` is what the hub code returns, as
for a repository fetched earlier by ``make models`` on a machine that had the hub.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants

from four_m.core.config import LabelerConfig
from four_m.labelers.clip import ClipLabeler

REPO = "four-m-test/tiny-clip"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
"""What the hub stores in LFS (its .gitattributes), blobs named by the file's sha256."""


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubCache:
    folder: Path

    def publish(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commit ``files`` (relative path -> bytes) to ``repo_id`` as ``main``; returns the commit,
        40 hex digits named after the tree, as git names commits by their content."""
        repo = self.folder / f"models--{repo_id.replace('/', '--')}"
        etags = {path: self.etag(path, data) for path, data in files.items()}
        commit = hashlib.sha1("".join(f"{etags[p]} {p}\n" for p in sorted(files)).encode()).hexdigest()
        for path, data in files.items():
            blob = repo / "blobs" / etags[path]
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return commit

    @staticmethod
    def etag(path: str, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_id(data)

    def blob(self, repo_id: str, commit: str, path: str) -> Path:
        """The blob that ``path`` of ``commit`` links to."""
        return (self.folder / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit / path).resolve()

    def use(self, monkeypatch) -> None:
        """Point this process's hub code, and (through the environment, forwarded by
        ``worker_options``) Ray's workers, at this cache, offline."""
        monkeypatch.setenv("HF_HUB_CACHE", str(self.folder))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(self.folder))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_clip_files(folder: Path, view_size: int = 32) -> dict[str, bytes]:
    """The tiny random-init CLIP's files, as its labeler builds them (without its build marker)."""
    labeler = ClipLabeler(LabelerConfig(), view_size, folder)
    labeler.prepare()
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != labeler.tiny_marker
    }
