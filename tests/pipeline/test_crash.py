"""Crash suite: SIGKILL a stage at random moments, rerun it, and compare with an uninterrupted run.

For each stage an uninterrupted run is the reference. A second root starts from the same inputs;
the stage's CLI is killed at seeded random points of its work (every process of the run at once,
Ray's workers included: a lost machine, not a shutdown), then rerun to completion. A kill point is
a number of units the run may still put in place, fewer than it has left (the run halts before the
next one: core/halt.py), and a delay after they are on disk, while the run's other processes work on
up to that halt. So every kill lands mid-work, on an idle machine or a loaded one. What must hold:
the outputs equal the reference's (table contents by checksum, tokenizer files byte for byte),
every key is there exactly once, files a killed run had finished are kept rather than redone, no
temporary file is left and every marker matches its files. The figures of each stage are printed
at the end of the pytest run.

Every test here is slow: ``make crash-test`` runs them (every stage of the embedded sample, several
kills each, and a single download kill and a single tokenize kill). ``make test`` keeps the shorter
kill-and-resume tests of tests/pipeline/test_{download,label,tokenize}.py.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from four_m.core.config import Config, load_config
from four_m.core.dataset_root import sha256_file
from four_m.core.halt import HALTED, halt_after
from four_m.core.runs import read_losses
from four_m.pipeline.download import run_download
from four_m.pipeline.tokenize import run_tokenize
from four_m.tokenize.fit import groups_of, members

SEED = int(os.environ.get("CRASH_SEED", "0"))
"""Kill moments are drawn from this seed (``CRASH_SEED=7 make crash-test`` tries other moments)."""
LONG_KILLS = 3
POLL_S = 0.05
RUN_LIMIT_S = 600
CHECKPOINT_EVERY = 3
LAST_CHECKPOINT = "runs/*/checkpoints/last.ckpt"
TRAIN = [
    "train.model=nano",
    "train.batch_size=4",
    "train.input_budget=24",
    "train.target_budget=24",
    "train.warmup_steps=2",
    "train.max_steps=24",
    f"train.checkpoint_every_n_steps={CHECKPOINT_EVERY}",
    "train.log_every_n_steps=1",
    "train.shuffle_buffer=8",
]


@dataclass
class Comparison:
    """A crashed-and-resumed root against the reference root, for one stage's outputs."""

    files: int = 0
    identical: int = 0
    rows: int = 0
    """Rows (keys) of the reference, over the stage's output folders."""
    lost: int = 0
    duplicates: int = 0
    redone: int = 0
    """Units of work done twice because a kill lost them (training steps since the last checkpoint)."""
    problems: list[str] = field(default_factory=list)
    """Anything that must not happen: a missing or extra file, a marker that does not match its files."""


@dataclass(frozen=True)
class Stage:
    verb: str
    writes: tuple[str, ...]
    """Root-relative folders the stage writes (removed to redo the stage)."""
    work: str
    """The folder where the stage's work shows first: kill points count from the run's first write there."""
    units: Callable[[Path], int]
    """Finished units of work on disk (shard markers, tokenizers, checkpoints): each one placement at ``placed``."""
    placed: str
    """Where putting a unit in place writes, relative to the root: the halt hook counts placements there."""
    finished: Callable[[Path, Config], list[Path]]
    """Files of finished units (of a root, with the run's config): a rerun must keep them as they are."""
    compare: Callable[[Path, Path], Comparison]
    redo_per_kill: int = 0
    """Units of work a kill may cost by design (training: the steps since the last checkpoint)."""


@dataclass(frozen=True)
class Launch:
    work_seconds: float
    """From the run's first write in ``Stage.work`` to its exit or kill."""
    killed: bool
    mid_work: bool
    """Killed while some of the stage's units were still unfinished."""
    returncode: int | None


@dataclass(frozen=True)
class KillPoint:
    """The run halts before putting more than ``units`` of the stage's units in place; it is killed
    ``seconds`` after it has begun writing and those ``units`` are on disk (or it has halted)."""

    units: int
    seconds: float


@dataclass
class CrashFigures:
    kills: int = 0
    """Kills, each mid-work: some of the stage's units unfinished."""
    kept: int = 0
    """Finished files that were on disk at a kill and that the reruns kept untouched."""


# --- killing a run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sessions:
    """How a launch is watched and killed: conftest's ``run_ended`` and ``kill_session``."""

    ended: Callable[[subprocess.Popen], bool]
    kill: Callable[[subprocess.Popen], None]


@pytest.fixture(scope="session")
def sessions(run_ended, kill_session) -> Sessions:
    return Sessions(run_ended, kill_session)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and time of every file under ``folder``: a change means the run is writing there."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # a temporary file renamed meanwhile
                stat = os.stat(os.path.join(parent, name))
                files[os.path.join(parent, name)] = (stat.st_size, stat.st_mtime_ns)
    return files


def _launch(
    stage: Stage,
    config_file: Path,
    root: Path,
    log: Path,
    sessions: Sessions,
    kill: KillPoint | None = None,
    total_units: int = 0,
) -> Launch:
    """Run the stage's CLI to its end, or halt it after ``kill.units`` more units and SIGKILL it."""
    watched = root / stage.work
    before = _snapshot(watched)
    units_before = stage.units(root)
    env = dict(os.environ)
    claims = log.with_name(f"{stage.verb}-halt-{time.monotonic_ns()}")
    if kill is not None:
        env.update(halt_after(kill.units, f"{glob.escape(str(root))}/{stage.placed}", claims))
    command = [sys.executable, "-m", "four_m", stage.verb, "--config", str(config_file), "--root", str(root)]
    with log.open("ab") as out:
        run = subprocess.Popen(
            [*command, "--no-progress"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    started = time.monotonic()
    writing_since = armed_since = None
    try:
        while not sessions.ended(run):
            now = time.monotonic()
            assert now - started < RUN_LIMIT_S, f"{stage.verb} ran past {RUN_LIMIT_S} s (log: {log})"
            if writing_since is None and _snapshot(watched) != before:
                writing_since = now
            waiting = kill is not None and writing_since is not None and armed_since is None
            # Its units on disk, or a halted run that is redoing a unit (a tokenizer group that a kill
            # left half in place puts its finished members in place again, and they count as placements).
            if waiting and (stage.units(root) >= units_before + kill.units or (claims / HALTED).exists()):
                armed_since = now
            if armed_since is not None and now - armed_since >= kill.seconds:
                sessions.kill(run)
                return Launch(now - writing_since, True, stage.units(root) < total_units, None)
            time.sleep(POLL_S)
    finally:
        if run.returncode is None:  # not reaped: it ended (Ray's workers may outlive it a moment), or failed
            sessions.kill(run)
    return Launch(time.monotonic() - (writing_since or started), False, False, run.returncode)


def crash_and_resume(
    stage: Stage,
    config_file: Path,
    root: Path,
    *,
    reference: Path,
    reference_seconds: float,
    kills: int,
    resume: Callable[[], None],
    sessions: Sessions,
) -> CrashFigures:
    """Kill the stage ``kills`` times at seeded random points of its work, then ``resume`` it to the end.

    A kill point is a random count of units the run may put in place, from none to all but one of
    those it has left (it halts before the next), plus a random part of one unit's reference time:
    only points the run reaches, whatever the pace of the machine, and every one mid-work.
    """
    rng = random.Random(f"{SEED}-{stage.verb}")
    figures = CrashFigures()
    log = root.parent / f"{stage.verb}.log"
    kept: dict[Path, tuple[int, int]] = {}
    config = load_config(config_file)
    total_units = stage.units(reference)
    unit_seconds = _unit_seconds(stage, config, reference, reference_seconds, total_units)
    root.mkdir(parents=True, exist_ok=True)
    while figures.kills < kills:
        point = KillPoint(rng.randrange(total_units - stage.units(root)), rng.uniform(0, unit_seconds))
        launch = _launch(stage, config_file, root, log, sessions, point, total_units)
        assert launch.killed, f"{stage.verb} ended (exit {launch.returncode}) before its halt, see {log}"
        assert launch.mid_work, f"{stage.verb} finished its work past its halt after {point.units} units"
        figures.kills += 1
        for path in stage.finished(root, config):
            kept.setdefault(path, _size_and_time(path))
    resume()
    redone = [str(p) for p, seen in kept.items() if not p.is_file() or _size_and_time(p) != seen]
    assert not redone, f"{stage.verb}: finished files were redone after a kill: {redone}"
    figures.kept = len(kept)
    return figures


def _unit_seconds(stage: Stage, config: Config, reference: Path, seconds: float, units: int) -> float:
    """What one unit of work took in the reference: the span of its finished files over the units
    after the first, or, where finished files are replaced as the stage goes, its seconds per unit."""
    times = [p.stat().st_mtime for p in stage.finished(reference, config)]
    span = max(times) - min(times) if times else 0.0
    return span / (units - 1) if span > 0 and units > 1 else seconds / units


def _size_and_time(path: Path) -> tuple[int, int]:
    """What a rewrite changes (the copies that undo a run keep both)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


# --- comparing outputs -------------------------------------------------------------------------


def _table_digest(path: Path) -> str:
    """Checksum of a Parquet file's contents (schema with its metadata, and every value), not its bytes."""
    table = pq.read_table(path).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _compare_tables(reference: Path, crashed: Path, pattern: str, result: Comparison) -> None:
    """Every file of ``pattern`` by content, and per folder: every reference key exactly once."""
    expected: dict[Path, Counter] = {}
    found: dict[Path, Counter] = {}
    for base, keys in ((reference, expected), (crashed, found)):
        for path in sorted(base.glob(pattern)):
            keys.setdefault(path.parent.relative_to(base), Counter()).update(
                pq.read_table(path, columns=["key"])["key"].to_pylist()
            )
    wanted = {p.relative_to(reference) for p in reference.glob(pattern)}
    got = {p.relative_to(crashed) for p in crashed.glob(pattern)}
    result.problems += [f"missing {p}" for p in sorted(wanted - got)]
    result.problems += [f"unexpected {p}" for p in sorted(got - wanted)]
    for relative in sorted(wanted & got):
        result.files += 1
        result.identical += _table_digest(reference / relative) == _table_digest(crashed / relative)
    for folder, keys in expected.items():
        present = found.get(folder, Counter())
        result.rows += sum(keys.values())
        result.lost += sum((keys - present).values())
        result.duplicates += sum(n - 1 for n in present.values() if n > 1)


def _compare_json(reference: Path, crashed: Path, pattern: str, volatile: set[str], result: Comparison) -> None:
    """JSON files of ``pattern``, but for their ``volatile`` keys (timings)."""
    for path in sorted(reference.glob(pattern)):
        other = crashed / path.relative_to(reference)
        result.files += 1
        if other.is_file():
            result.identical += _json_without(path, volatile) == _json_without(other, volatile)
        else:
            result.problems.append(f"missing {path.relative_to(reference)}")


def _json_without(path: Path, volatile: set[str]) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in volatile}


def _check_markers(reference: Path, crashed: Path, pattern: str, result: Comparison) -> None:
    """The same markers as the reference, with its row counts, each listing files that are on disk as recorded."""
    wanted = {p.relative_to(reference) for p in reference.glob(pattern)}
    got = {p.relative_to(crashed) for p in crashed.glob(pattern)}
    result.problems += [f"marker missing: {p}" for p in sorted(wanted - got)]
    result.problems += [f"marker unexpected: {p}" for p in sorted(got - wanted)]
    for relative in sorted(wanted & got):
        marker = json.loads((crashed / relative).read_text())
        if marker["rows"] != json.loads((reference / relative).read_text())["rows"]:
            result.problems.append(f"{relative}: {marker['rows']} rows, the reference has another count")
        for digest in marker["files"]:
            file = crashed / digest["path"]
            if not file.is_file() or file.stat().st_size != digest["bytes"] or sha256_file(file) != digest["sha256"]:
                result.problems.append(f"{relative}: {digest['path']} is not the file it records")


def _compare_download(reference: Path, crashed: Path) -> Comparison:
    result = Comparison()
    _compare_tables(reference, crashed, "images/*.parquet", result)
    _compare_json(reference, crashed, "images/*_stats.json", {"seconds"}, result)
    _check_markers(reference, crashed, "_state/download/*.done.json", result)
    return result


def _compare_label(reference: Path, crashed: Path) -> Comparison:
    result = Comparison()
    _compare_tables(reference, crashed, "labels/*/*.parquet", result)
    _check_markers(reference, crashed, "_state/label/*/*.done.json", result)
    return result


def _compare_tokens(reference: Path, crashed: Path) -> Comparison:
    result = Comparison()
    _compare_tables(reference, crashed, "tokens/*/*.parquet", result)
    _check_markers(reference, crashed, "_state/tokenize/*/*.done.json", result)
    return result


def _tokenizer_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("tokenizers/[!.]*/trained.json"))


def _compare_tokenizers(reference: Path, crashed: Path) -> Comparison:
    """Every tokenizer trained exactly once, file by file: weights, vocabulary, config, metrics, logs."""
    result = Comparison()
    for folder in _tokenizer_folders(reference):
        other = crashed / folder.relative_to(reference)
        names = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
        if sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file()) != names:
            result.problems.append(f"{folder.name}: not the files of the reference's")
            continue
        for name in names:
            result.files += 1
            result.identical += sha256_file(folder / name) == sha256_file(other / name)
    result.rows = len(_tokenizer_folders(reference))
    result.lost = result.rows - len(_tokenizer_folders(crashed))
    return result


def _run_folder(root: Path) -> Path:
    (run,) = (root / "runs").iterdir()
    return run


def _compare_training(reference: Path, crashed: Path) -> Comparison:
    """Every step's loss and the final weights against the uninterrupted run."""
    result = Comparison()
    expected = dict(read_losses(_run_folder(reference) / "logs"))
    got = dict(read_losses(_run_folder(crashed) / "logs"))
    result.rows = len(expected)
    result.lost = len(set(expected) - set(got))
    result.files = 1 + len(expected)
    result.identical = sum(got.get(s) == pytest.approx(v, rel=1e-5) for s, v in expected.items())
    result.redone = _steps_logged(_run_folder(crashed) / "logs") - len(got)
    weights, again = (load_file(_run_folder(r) / "model.safetensors") for r in (reference, crashed))
    result.identical += weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    return result


def _steps_logged(logs: Path) -> int:
    """Training steps logged over every launch of a run: a step run twice counts twice."""
    steps = 0
    for metrics in logs.glob("version_*/metrics.csv"):
        with metrics.open() as handle:
            steps += sum(1 for row in csv.DictReader(handle) if row.get("train/loss"))
    return steps


def _count(pattern: str) -> Callable[[Path], int]:
    """Files of ``pattern``: the markers, one per shard of each output (labeler, modality)."""
    return lambda root: len(list(root.glob(pattern)))


def _marked_files(pattern: str) -> Callable[[Path, Config], list[Path]]:
    def files(root: Path, config: Config) -> list[Path]:
        listed = []
        for marker in root.glob(pattern):
            listed += [marker, *(root / f["path"] for f in json.loads(marker.read_text())["files"])]
        return listed

    return files


def _trained_files(root: Path, config: Config) -> list[Path]:
    """The files of every group whose tokenizers are all in place. A group (the text tokenizers, which
    share one vocabulary; a map and the maps that share its tokenizer) trains as one and puts its
    members in place one by one: a kill between two leaves the group to train again, whole."""
    trained = set(_tokenizer_folders(root))
    files = []
    for group in groups_of(config.tokenize):
        folders = [root / "tokenizers" / member for member in members(group, config.tokenize)]
        if trained.issuperset(folders):
            files += [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    return files


def _checkpoints(root: Path) -> int:
    """Checkpoints put in place: ``last.ckpt``'s step over the interval (a rerun resumes from it)."""
    last = list(root.glob(LAST_CHECKPOINT))
    return _global_step(last[0], *_size_and_time(last[0])) // CHECKPOINT_EVERY if last else 0


@functools.cache
def _global_step(path: Path, size: int, mtime_ns: int) -> int:
    """Read once per version of the file (size and time are the key): it is polled while the run goes."""
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


STAGES = {
    "download": Stage(
        "download",
        ("urls", "_sample_site", "images", "_state/download"),
        "images",
        _count("_state/download/*.done.json"),
        "_state/download/*.done.json",
        _marked_files("_state/download/*.done.json"),
        _compare_download,
    ),
    "label": Stage(
        "label",
        ("_models", "labels", "_state/label"),
        "_state/label",  # labels/ sees a shard only when it is done: its run config is written first
        _count("_state/label/*/*.done.json"),
        "_state/label/*/*.done.json",
        _marked_files("_state/label/*/*.done.json"),
        _compare_label,
    ),
    "tokenizers": Stage(
        "tokenizers",
        ("tokenizers", "_state/tokenizers"),
        "tokenizers",
        lambda root: len(_tokenizer_folders(root)),
        "tokenizers/*",  # a trained tokenizer's folder, put in place whole
        _trained_files,
        _compare_tokenizers,
    ),
    "tokenize": Stage(
        "tokenize",
        ("tokens", "_state/tokenize"),
        "tokens",
        _count("_state/tokenize/*/*.done.json"),
        "_state/tokenize/*/*.done.json",
        _marked_files("_state/tokenize/*/*.done.json"),
        _compare_tokens,
    ),
    "train": Stage(
        "train", ("runs",), "runs", _checkpoints, LAST_CHECKPOINT, lambda *_: [], _compare_training, CHECKPOINT_EVERY
    ),
}


def _leftovers(root: Path) -> list[str]:
    """Temporary files and folders anywhere under the root."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or p.name in ("_tmp", ".tmp")
    )


def _check(stage: Stage, reference: Path, crashed: Path, figures: CrashFigures, seconds: float) -> str:
    """Assert what must hold after the crashes; the stage's figure line."""
    result = stage.compare(reference, crashed)
    leftovers = _leftovers(crashed)
    assert not result.problems, f"{stage.verb}: {result.problems}"
    assert not leftovers, f"{stage.verb}: temporary files left: {leftovers}"
    assert result.lost == 0 and result.duplicates == 0, f"{stage.verb}: {result}"
    assert result.redone <= figures.kills * stage.redo_per_kill, f"{stage.verb}: redone, not resumed: {result}"
    assert result.files > 0 and result.identical == result.files, f"{stage.verb}: {result}"
    return (
        f"crash {stage.verb}: kills {figures.kills}, all mid-work,"
        f" reruns {figures.kills},"
        f" files compared {result.files} (identical {result.identical}),"
        f" rows {result.rows} each exactly once,"
        f" samples lost {result.lost}, finished files kept {figures.kept},"
        f"{f' steps redone {result.redone} (since the last checkpoint),' if stage.redo_per_kill else ''}"
        f" temp files left 0; {seconds:.0f} s"
        f" [seed {SEED}]"
    )


# --- figures at the end of the run -------------------------------------------------------------


class _FigureLines:
    """A pytest plugin that prints the suite's figure lines in the terminal summary, captured or not."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.lines:
            terminalreporter.section("crash suite")
            for line in self.lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def figure_lines(pytestconfig) -> list[str]:
    plugin = _FigureLines()
    pytestconfig.pluginmanager.register(plugin, "crash-figures")
    return plugin.lines


def _write_config(config: Config, path: Path) -> Path:
    path.write_text(config.to_yaml())
    return path


# --- the default suite: one kill of download (tokenize's single kill runs with make crash-test; ---
# --- the suite already kills tokenize once in tests/pipeline/test_tokenize.py) ------------------


@pytest.mark.slow  # make test kills each stage once through tests/pipeline/test_{download,label,tokenize}.py
def test_a_download_killed_at_random_resumes_to_the_uninterrupted_output(
    tmp_path, ray_local, small_config, free_ports, sessions, figure_lines
):
    (port,) = free_ports(1)
    reference = small_config(tmp_path / "reference", f"sample.port={port}", "download.samples_per_shard=4")
    seconds = run_download(reference, progress=False).seconds
    started = time.perf_counter()
    crashed = dataclasses.replace(reference, root=str(tmp_path / "crashed"))
    figures = crash_and_resume(
        STAGES["download"],
        _write_config(reference, tmp_path / "config.yaml"),
        Path(crashed.root),
        reference=Path(reference.root),
        reference_seconds=seconds,
        kills=1,
        resume=lambda: run_download(crashed, progress=False),
        sessions=sessions,
    )
    seconds = time.perf_counter() - started
    figure_lines.append(_check(STAGES["download"], Path(reference.root), Path(crashed.root), figures, seconds))


@pytest.mark.slow
def test_tokenize_killed_at_random_resumes_to_the_uninterrupted_output(tmp_path, tokenized, sessions, figure_lines):
    reference, _, _, summary = tokenized
    started = time.perf_counter()
    root = tmp_path / "crashed"
    shutil.copytree(reference.root, root, ignore=shutil.ignore_patterns("tokens", "tokenize"))
    crashed = dataclasses.replace(reference, root=str(root))
    figures = crash_and_resume(
        STAGES["tokenize"],
        _write_config(reference, tmp_path / "config.yaml"),
        root,
        reference=Path(reference.root),
        reference_seconds=summary.seconds,
        kills=1,
        resume=lambda: run_tokenize(crashed, progress=False),
        sessions=sessions,
    )
    seconds = time.perf_counter() - started
    figure_lines.append(_check(STAGES["tokenize"], Path(reference.root), root, figures, seconds))


# --- the long variant (make crash-test): every stage, several kills ----------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory, small_config, tiny_tokenizers, free_ports, sessions) -> tuple[Path, Path, dict[str, float]]:
    """The embedded sample through every stage, uninterrupted, by the CLI: the reference of every
    stage and the inputs of the next. Returns the config file, the root and each stage's work seconds."""
    base = tmp_path_factory.mktemp("crash")
    overrides = [f"sample.port={free_ports(1)[0]}", "download.samples_per_shard=4", *tiny_tokenizers, *TRAIN]
    config = small_config(base / "reference", *overrides)
    config_file = _write_config(config, base / "config.yaml")
    seconds = {}
    for stage in STAGES.values():
        log = base / f"reference-{stage.verb}.log"
        launch = _launch(stage, config_file, Path(config.root), log, sessions)
        assert launch.returncode == 0, f"the uninterrupted {stage.verb} failed, see {log}"
        seconds[stage.verb] = launch.work_seconds
    return config_file, Path(config.root), seconds


def _inputs_of(reference: Path, root: Path, verb: str) -> None:
    """A copy of the reference root as it was before ``verb`` ran: its and later stages' folders removed."""
    shutil.copytree(reference, root)
    later = list(STAGES)[list(STAGES).index(verb) :]
    for folder in (f for name in later for f in STAGES[name].writes):
        shutil.rmtree(root / folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the first one builds the whole chain: minutes on a busy 2-core machine
@pytest.mark.parametrize("verb", list(STAGES))
def test_every_stage_killed_at_random_resumes_to_the_uninterrupted_output(
    verb, chain, tmp_path, sessions, figure_lines
):
    config_file, reference, seconds = chain
    stage = STAGES[verb]
    root = tmp_path / "crashed"
    _inputs_of(reference, root, verb)
    started = time.perf_counter()

    def finish() -> None:
        launch = _launch(stage, config_file, root, tmp_path / f"{verb}.log", sessions)
        assert launch.returncode == 0, f"the rerun of {verb} failed, see {tmp_path / f'{verb}.log'}"

    figures = crash_and_resume(
        stage,
        config_file,
        root,
        reference=reference,
        reference_seconds=seconds[verb],
        kills=LONG_KILLS,
        resume=finish,
        sessions=sessions,
    )
    assert figures.kills >= 1, "no kill landed before the stage finished"
    figure_lines.append(_check(stage, reference, root, figures, time.perf_counter() - started))
