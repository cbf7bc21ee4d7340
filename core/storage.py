"""Where a dataset root lives: a local folder, or a folder on any fsspec filesystem (s3://, gs://, ...).

A remote root is a ``universal_pathlib`` path, so the stages use one pathlib API for both kinds;
this module holds what that API does not cover: pyarrow's filesystem argument, a replace that
also works where rename is copy-and-delete, removing a tree, and the local copies that libraries
which only read local files (Hugging Face loaders, ``tokenizers``) need.

Endpoints and credentials come from fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``,
``FSSPEC_S3_KEY``... environment variables, or ``~/.config/fsspec/``) and the cloud SDKs' usual
variables, never from the run's config: that is written into the root and into its card.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeAlias

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from four_m.core.errors import UserError
from four_m.core.halt import before_placing

RootPath: TypeAlias = Path | UPath
"""A local path, or a remote one (``UPath``): both speak pathlib."""

LOCAL_SCHEMES = ("", "file", "local")
ENV_PREFIXES = ("FSSPEC_", "AWS_", "GOOGLE_", "AZURE_")
"""Environment variables that configure fsspec filesystems: forwarded to Ray workers on other nodes."""


def location(path: str | os.PathLike | UPath) -> RootPath:
    """``path`` as a local absolute path, or a remote one when it names a non-local protocol."""
    if isinstance(path, UPath):
        return path if is_remote(path) else Path(path.path).resolve()
    text = os.fspath(path)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() in LOCAL_SCHEMES:
        return Path(rest if sep else text).resolve()
    return UPath(text)


def is_remote(path: RootPath) -> bool:
    return isinstance(path, UPath) and path.protocol not in LOCAL_SCHEMES


def storage_env() -> dict[str, str]:
    """The process's filesystem settings, for workers that do not inherit its environment."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def replace(source: RootPath, target: RootPath) -> None:
    """Move ``source`` over ``target``. Locally atomic; on an object store a copy then a delete,
    which is enough because readers trust a shard only through the marker written after it."""
    before_placing(str(target))
    if is_remote(target):
        target.fs.mv(source.path, target.path)
    else:
        os.replace(source, target)


def remove_tree(path: RootPath) -> None:
    """Remove a folder and everything under it; nothing if it is not there."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def move_folder(source: RootPath, target: RootPath) -> None:
    """Rename a folder to ``target``, which must not exist. Locally one atomic rename; on an object
    store a copy of every file then a delete (it has no folders to rename)."""
    if is_remote(target):
        target.fs.mv(source.path, target.path, recursive=True)
    else:
        os.rename(source, target)


def copy_tree(source: RootPath, target: RootPath) -> None:
    """Copy a folder within one filesystem (a local tree, or a prefix of one bucket)."""
    if is_remote(target):
        target.fs.copy(source.path.rstrip("/") + "/", target.path, recursive=True)
    else:
        shutil.copytree(source, target)


class ScratchError(UserError):
    """The scratch base folder exists but is not private to this user; the message names it."""


def scratch_base() -> Path:
    """This user's private folder in the machine's temporary space, ``$TMPDIR/four_m-<uid>``.

    Temporary space is shared by every local user and scratch names are predictable (a rerun's
    cleanup finds its folder by name), so another user could create a scratch folder first and
    plant files that a stage later loads. The base is therefore created with mode 0700, and one
    that already exists is used only if it is a real folder (not a link), owned by us, with no
    group or other permissions.
    """
    base = Path(tempfile.gettempdir()) / f"four_m-{os.getuid()}"
    try:
        base.mkdir(mode=0o700)
        os.chmod(base, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    found = os.lstat(base)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise ScratchError(
            f"scratch folder {base} is not private to this user (owner uid {found.st_uid}, mode "
            f"{stat.filemode(found.st_mode)}; needed: a folder owned by uid {os.getuid()}, mode drwx------): "
            "if you did not create it, someone else may have; remove it or set TMPDIR to a private folder"
        )
    return base


def scratch(folder: RootPath) -> Path:
    """A local folder for work files under ``folder``: the folder itself when it is local (so a
    rerun's cleanup finds them), else a folder of this user's private scratch base named after it
    (the same name every run, for the same reason)."""
    if not is_remote(folder):
        return folder
    return scratch_base() / hashlib.sha256(str(folder).encode()).hexdigest()[:16]


@contextmanager
def local_copy(folder: RootPath) -> Iterator[Path]:
    """``folder`` itself when local; else a private copy of it on this machine, removed after the
    block (load what it holds inside the block). Private: the actors of one node copy at once."""
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="four_m-copy-") as temp:
        download_folder(folder, Path(temp))
        yield Path(temp)


@contextmanager
def local_file(path: RootPath) -> Iterator[Path]:
    """``path`` itself when local; else a temporary local copy of the one file, for the block."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="four_m-file-") as temp:
        target = Path(temp) / path.name
        path.fs.get_file(path.path, str(target))
        yield target


def list_files(folder: RootPath) -> Iterator[str]:
    """Every file under ``folder``, as a path relative to it (``logs/metrics.csv``), from one
    listing: a remote folder's files are not asked about one by one. Nothing if it is not there."""
    if is_remote(folder):
        prefix = folder.path.rstrip("/") + "/"
        for found in folder.fs.find(folder.path):
            if found.startswith(prefix):
                yield found[len(prefix) :]
        return
    for parent, _, names in os.walk(folder):
        for name in names:
            yield (Path(parent) / name).relative_to(folder).as_posix()


def download_folder(folder: RootPath, target: Path) -> None:
    """Copy every file under a remote ``folder`` into the local ``target`` folder."""
    for source in folder.rglob("*"):
        if source.is_file():
            destination = target / source.relative_to(folder).as_posix()
            destination.parent.mkdir(parents=True, exist_ok=True)
            source.fs.get_file(source.path, str(destination))


def publish_folder(local: Path, final: RootPath, last: str) -> None:
    """Put a finished local folder at ``final``, the file named ``last`` written last: readers
    take the folder as complete only once that file exists (an object store has no folder rename)."""
    before_placing(str(final))
    remove_tree(final)
    if not is_remote(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, final)
        return
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == last)
    for file in files:
        target = final / file.relative_to(local).as_posix()
        target.fs.put_file(str(file), target.path)
    shutil.rmtree(local, ignore_errors=True)


def _arrow(path: RootPath) -> tuple[str, object | None]:
    """pyarrow's (path, filesystem) for a root path; pyarrow wraps fsspec filesystems itself."""
    return (path.path, path.fs) if is_remote(path) else (str(path), None)


def read_table(path: RootPath, **kwargs) -> pa.Table:
    where, filesystem = _arrow(path)
    return pq.read_table(where, filesystem=filesystem, **kwargs)


def write_table(table: pa.Table, path: RootPath, **kwargs) -> None:
    where, filesystem = _arrow(path)
    pq.write_table(table, where, filesystem=filesystem, **kwargs)


def read_schema(path: RootPath) -> pa.Schema:
    where, filesystem = _arrow(path)
    return pq.read_schema(where, filesystem=filesystem)


def parquet_file(path: RootPath) -> pq.ParquetFile:
    where, filesystem = _arrow(path)
    return pq.ParquetFile(where, filesystem=filesystem)


def parquet_writer(path: RootPath, schema: pa.Schema, **kwargs) -> pq.ParquetWriter:
    where, filesystem = _arrow(path)
    return pq.ParquetWriter(where, schema, filesystem=filesystem, **kwargs)
