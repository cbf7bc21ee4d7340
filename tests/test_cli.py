"""The command line: one subcommand per verb with only its options; an unusable root stops every verb that
writes, in one line, before any work."""

import dataclasses
import logging
import subprocess
import sys

import pytest

from four_m import cli
from four_m.cli import main
from four_m.core.config import load_config


@pytest.mark.parametrize("verb", ["download", "label", "tokenize", "train", "sample", "card"])
def test_a_root_that_is_a_file_stops_the_verb_in_one_line(tmp_path, capsys, verb):
    root = tmp_path / "root"
    root.write_text("not a folder")
    assert main([verb, "--root", str(root), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error == f"four_m {verb}: error: dataset root {root}: {root} is a file, not a folder\n"


def test_a_root_whose_parent_is_missing_stops_the_command_in_one_line(tmp_path):
    root = tmp_path / "typo" / "root"
    run = subprocess.run(
        [sys.executable, "-m", "four_m", "label", "--root", str(root), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"four_m label: error: dataset root {root}: ")
    assert f"its parent folder {root.parent} does not exist" in run.stderr
    assert not root.parent.exists()


# --- one subcommand per verb, with only that verb's options ---

COMMON = ("--config", "--root", "--set", "--no-progress", "--force-unlock")
OWN = {
    "download": ("--retry-failed",),
    "label": ("--only",),
    "preview": ("--samples",),
    "preview-tokens": ("--samples",),
    "sample": ("--image", "--caption"),
    "import-4m": ("--source", "--leave-out", "--replace"),
}
"""Each verb's own options; every other verb has none."""


def test_another_verbs_option_is_refused_by_the_verbs_own_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["label", "--image", "x.jpg"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "python -m four_m label: error: unrecognized arguments: --image x.jpg" in error
    assert "--only" in error  # the usage line shows what label does take


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["label", "--only", "depth,det"], {"only": "depth,det"}),
        (["download", "--retry-failed"], {"retry_failed": True}),
        (["download"], {"retry_failed": False}),
        (["preview", "--samples", "3"], {"samples": 3}),
        (["preview-tokens"], {"samples": 8}),
        (["sample", "--image", "x.jpg", "--caption", "a dog"], {"image": "x.jpg", "caption": "a dog"}),
        (["import-4m", "--source", "m"], {"source": "m", "replace": False}),
        (["import-4m", "--source", "m", "--replace"], {"source": "m", "replace": True}),
    ],
)
def test_each_verb_parses_its_own_options(argv, expected):
    args = cli._parse(argv)
    assert {key: getattr(args, key) for key in expected} == expected


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_verb_takes_the_common_options(verb):
    args = cli._parse([verb, "--config", "c.yaml", "--root", "r", "--set", "a.b=1", "--no-progress", "--force-unlock"])
    assert (args.verb, args.config, args.root, args.overrides) == (verb, "c.yaml", "r", ["a.b=1"])
    assert args.no_progress and args.force_unlock


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_a_verbs_help_lists_the_common_options_and_only_its_own(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    own = OWN.get(verb, ())
    others = {option for options in OWN.values() for option in options} - set(own)
    assert all(option in text for option in (*COMMON, *own))
    assert not [option for option in others if option in text]


def test_demo_runs_every_stage_in_order_each_with_its_own_defaults(monkeypatch):
    seen = []

    runs = []

    def record(name):
        def run(config, args):
            seen.append((name, {k: v for k, v in vars(args).items() if k in {"only", "retry_failed", "image"}}))
            runs.append((name, config.train.run))
            return {"label": 1}.get(name, 0)

        return run

    for name, _ in cli.DEMO:
        monkeypatch.setitem(cli.VERBS, name, dataclasses.replace(cli.VERBS[name], run=record(name)))
    config = load_config("default", ["finetune.train.run=tuned"])
    assert cli._demo(config, cli._parse(["demo", "--no-progress"])) == 1  # the worst status of the stages
    assert [name for name, _ in seen] == [name for name, _ in cli.DEMO]
    # The first eval scores the trained run; the one after finetune, the fine-tuned run.
    assert [run for name, run in runs if name == "eval"] == ["tiny", "tuned"]
    assert ("finetune", "tiny") in runs  # make finetune reads finetune.train itself
    assert dict(seen)["label"] == {"only": None}
    assert dict(seen)["download"] == {"retry_failed": False}
    assert dict(seen)["sample"] == {"image": None}


def test_the_cli_shows_library_warnings_once_on_stderr(tmp_path, capsys):
    root = tmp_path / "root"
    root.write_text("a file: every verb stops before any work")
    for _ in range(2):
        main(["card", "--root", str(root)])
    capsys.readouterr()
    logging.getLogger("four_m.pipeline.label").warning("depth: batch of 4 retried row by row")
    assert capsys.readouterr().err == "four_m.pipeline.label: WARNING: depth: batch of 4 retried row by row\n"
