"""Are two dataset roots made from the same inputs identical? Every file compared, each difference named.

    python bench/reproducible.py ROOT_A ROOT_B      # compare two finished roots
    python bench/reproducible.py --demo [--keep]    # `four_m demo` into two fresh roots, then compare

Files are paired by their path under the root (a TensorBoard event file, whose name holds its
creation time, host and process id, is paired by its folder). A pair with equal bytes is identical;
otherwise the difference is looked into: a Parquet file's table contents and key-value metadata
apart, a JSON file's values key by key, any other file as bytes. A difference is expected only
where a file records a time (durations and ``TIME_KEYS`` in JSON, ``TIME_FILES`` as a whole); the digests a
marker lists of files that differ are judged with those files. Anything else is a reproducibility
bug: it is printed under UNEXPECTED and the exit status is 1. docs/design.md (Reproducibility)
lists what is expected to differ and why.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

TIME_KEYS = frozenset({"finished_at", "at"})
"""JSON keys holding a time, besides durations (``seconds``, ``*_seconds``): a marker's completion
time, a retried fetch's."""

TIME_FILES = {
    "runs/*/tensorboard/*/events.out.tfevents.*": "TensorBoard stamps every event with its wall time",
}
"""Files that record times throughout, by pattern: compared as a whole, never expected to match."""

DIGEST_KEYS = frozenset({"sha256", "bytes"})
"""Under a marker's ``files`` or ``inputs``: a listed file's digest, equal whenever that file is."""


def files_of(root: Path) -> dict[str, Path]:
    """Every file under ``root`` by its comparison name: the relative path, an event file's folder."""
    named = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if path.name.startswith("events.out.tfevents."):
            name = f"{path.parent.relative_to(root).as_posix()}/events.out.tfevents.*"
        named[name] = path
    return named


def compare(a: Path, b: Path) -> tuple[int, dict[str, list[str]], dict[str, list[str]]]:
    """Identical files, and the others: expected (a time) and unexpected, each with its reasons."""
    files_a, files_b = files_of(a), files_of(b)
    expected: dict[str, list[str]] = {}
    unexpected: dict[str, list[str]] = {}
    for name in sorted(files_a.keys() ^ files_b.keys()):
        unexpected[name] = [f"only in {a if name in files_a else b}"]
    identical = 0
    for name in sorted(files_a.keys() & files_b.keys()):
        left, right = files_a[name], files_b[name]
        if _sha256(left) == _sha256(right):
            identical += 1
            continue
        timed = next((why for pattern, why in TIME_FILES.items() if fnmatch.fnmatch(name, pattern)), None)
        if timed:
            expected[name] = [timed]
            continue
        times, others = _differences(left, right)
        if others:
            unexpected[name] = others + times
        else:
            expected[name] = times
    return identical, expected, unexpected


def _differences(left: Path, right: Path) -> tuple[list[str], list[str]]:
    """What differs between two files of the same name: (time differences, other differences)."""
    if left.suffix == ".parquet":
        return [], list(_parquet_differences(left, right))
    if left.suffix == ".json":
        try:
            values = json.loads(left.read_text()), json.loads(right.read_text())
        except ValueError:
            return [], ["bytes (not JSON)"]
        times, others = [], []
        for path in _json_differences(*values, ""):
            keys = [k for k in path.replace("]", "").replace("[", ".").split(".") if k]
            if keys and _is_time(keys[-1]):
                times.append(f"time: {path}")
            elif keys and keys[0] in ("files", "inputs") and keys[-1] in DIGEST_KEYS:
                times.append(f"digest of a listed file: {path}")
            else:
                others.append(f"value: {path}")
        return times, others or ([] if times else ["bytes (same values, other layout)"])
    return [], ["bytes"]


def _is_time(key: str) -> bool:
    return key in TIME_KEYS or key == "seconds" or key.endswith("_seconds")


def _parquet_differences(left: Path, right: Path) -> Iterator[str]:
    """Table contents and key-value metadata apart: data and provenance are different bugs."""
    table_a, table_b = pq.read_table(left), pq.read_table(right)
    meta_a, meta_b = table_a.schema.metadata or {}, table_b.schema.metadata or {}
    same_table = table_a.replace_schema_metadata(None).equals(table_b.replace_schema_metadata(None))
    if not same_table:
        columns = [c for c in table_a.column_names if c not in table_b.column_names]
        columns += [c for c in table_a.column_names if c in table_b.column_names and not table_a[c].equals(table_b[c])]
        yield f"table contents: columns {columns}" if columns else "table contents: schema"
    keys = [k for k in sorted(meta_a.keys() | meta_b.keys()) if meta_a.get(k) != meta_b.get(k)]
    yield from (f"metadata: {k.decode()}" for k in keys)
    if same_table and not keys:
        yield "file layout (same table and metadata)"


def _json_differences(a: object, b: object, path: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            yield from _json_differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _json_differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield path or "(whole file)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_demo(root: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "four_m", "demo", "--root", str(root), "--no-progress"], check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", type=Path, help="two dataset roots to compare")
    parser.add_argument("--demo", action="store_true", help="make both roots with `four_m demo` first")
    parser.add_argument("--keep", action="store_true", help="with --demo: keep the two roots")
    args = parser.parse_args()
    if args.demo == bool(args.roots) or (args.roots and len(args.roots) != 2):
        parser.error("give two roots, or --demo")
    if args.demo:
        base = Path(tempfile.mkdtemp(prefix="four_m-reproducible-"))
        a, b = base / "a", base / "b"
        for root in (a, b):
            print(f"demo into {root}: {_run_demo(root):.0f} s", flush=True)
    else:
        a, b = args.roots
    identical, expected, unexpected = compare(a, b)
    print(f"identical: {identical} files")
    for title, found in (("records a time (expected)", expected), ("UNEXPECTED", unexpected)):
        print(f"{title}: {len(found)} files")
        for name, reasons in found.items():
            print(f"  {name}: {'; '.join(reasons)}")
    if args.demo and not args.keep and not unexpected:
        shutil.rmtree(base)
    elif args.demo:
        print(f"roots kept in {base}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
