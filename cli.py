"""``python -m four_m <verb> --config ... [--root ...] [--set section.key=value ...]``: a verb per stage.

Each verb is a subcommand that takes the common options and only its own (``label --only``,
``download --retry-failed``, ...): another verb's option is an error, not silently ignored.
Expected problems (a bad config, a malformed url list, a busy port, a run that does not match the
tokenizers, a root that is a file or not writable) end with one line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from four_m.core.config import Config, load_config
from four_m.core.dataset_root import check_root_writable
from four_m.core.errors import UserError
from four_m.core.stage_lock import force_unlock
from four_m.core.storage import location
from four_m.core.summary import StageSummary


def _sample_urls(config: Config, args: argparse.Namespace) -> int:
    from four_m.core.dataset_root import DatasetRoot
    from four_m.pipeline.sample_site import build_sample

    print(f"sample-urls: wrote {build_sample(DatasetRoot(config.root), config.sample)}")
    return 0


def _download(config: Config, args: argparse.Namespace) -> int:
    from four_m.pipeline.download import run_download, run_retry_failed

    if args.retry_failed:
        retry = run_retry_failed(config, progress=not args.no_progress)
        print(retry.line())
        for shard, error in sorted(retry.shards_failed.items()):
            print(f"  shard {shard:05d} failed: {error}", file=sys.stderr)
        return 1 if retry.shards_failed else 0
    return _report(run_download(config, progress=not args.no_progress))


def _label(config: Config, args: argparse.Namespace) -> int:
    from four_m.pipeline.label import run_label

    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) if args.only else ()
    summary = run_label(config, only=only, progress=not args.no_progress)
    print("\n".join(summary.lines()))
    return 0


def _curate(config: Config, args: argparse.Namespace) -> int:
    from four_m.pipeline.curate import run_curate

    summary = run_curate(config, progress=not args.no_progress)
    print("\n".join(summary.lines()))
    return 1 if summary.shards_failed else 0


def _curate_report(config: Config, args: argparse.Namespace) -> int:
    from four_m.pipeline.curate_report import write_curate_report

    for path in write_curate_report(config):
        print(f"curate-report: wrote {path}")
    return 0


def _preview(config: Config, args: argparse.Namespace) -> int:
    from four_m.tokenize.label_preview import write_label_preview

    print(f"preview: wrote {write_label_preview(config, samples=args.samples)}")
    return 0


def _tokenizers(config: Config, args: argparse.Namespace) -> int:
    from four_m.pipeline.tokenizers import run_tokenizer_training

    summary = run_tokenizer_training(config)
    print("\n".join(summary.lines()))
    return 1 if summary.failed else 0


def _tokenize(config: Config, args: argparse.Namespace) -> int:
    from four_m.pipeline.tokenize import run_tokenize

    summary = run_tokenize(config, progress=not args.no_progress)
    print("\n".join(summary.lines()))
    return 1 if summary.shards_failed else 0


def _preview_tokens(config: Config, args: argparse.Namespace) -> int:
    from four_m.tokenize.preview import write_crop_preview, write_token_preview

    print(f"preview-tokens: wrote {write_token_preview(config, samples=args.samples)}")
    print(f"preview-tokens: wrote {write_crop_preview(config)} (one image's crops side by side)")
    return 0


def _train(config: Config, args: argparse.Namespace) -> int:
    from four_m.train.run import run_train

    print("\n".join(run_train(config).lines()))
    return 0


def _finetune(config: Config, args: argparse.Namespace) -> int:
    from four_m.train.run import run_finetune

    print("\n".join(run_finetune(config).lines()))
    return 0


def _import_4m(config: Config, args: argparse.Namespace) -> int:
    from four_m.train.import_run import run_import

    if not args.source:
        raise UserError("import-4m needs --source (make import-4m SOURCE=<folder or hub id>): the model to convert")
    leave_out = [name for name in (args.leave_out or "").split(",") if name]
    print("\n".join(run_import(config, args.source, leave_out, replace=args.replace).lines()))
    return 0


def _probe(config: Config, args: argparse.Namespace) -> int:
    from four_m.train.probe import run_probe

    print("\n".join(run_probe(config).lines()))
    return 0


def _sample(config: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from four_m.train.sample import write_samples

    image = Path(args.image) if args.image else None
    print(f"sample: wrote {write_samples(config, image=image, caption=args.caption)}")
    return 0


def _eval(config: Config, args: argparse.Namespace) -> int:
    from four_m.train.evaluate import run_eval

    print("\n".join(run_eval(config).lines()))
    return 0


def _card(config: Config, args: argparse.Namespace) -> int:
    from four_m.datasets_cards.card import write_card

    print(f"card: wrote {write_card(config)}")
    return 0


def _bad_input(config: Config, args: argparse.Namespace) -> int:
    """The bad-input corpus through download, label, tokenizers and tokenize, then its audit."""
    from four_m.pipeline.bad_inputs import run_bad_input

    run = run_bad_input(config, progress=not args.no_progress)
    print("\n".join([*run.lines, run.audit.line(), *(f"  {p}" for p in run.audit.problems)]))
    return 1 if run.audit.problems or run.audit.lost else 0


def _verify(config: Config, args: argparse.Namespace) -> int:
    """Every file the root's markers record against them; exit 1 naming each one that does not hold."""
    from four_m.core.verify import verify_root

    verification = verify_root(config.root)
    print("\n".join(verification.lines()))
    return 0 if verification.ok else 1


def _models(config: Config, args: argparse.Namespace) -> int:
    """Fetch production weights for the configured labelers (a hub id at its pinned commit: needs a
    reachable hub) and record each file's sha256 in ``<root>/models/<modality>.json``; with
    ``--omnidata`` / ``--omnidata-depth``, first convert Omnidata's normal / depth checkpoint into
    ``label.normal.model`` / ``label.depth.model``."""
    from pathlib import Path

    from four_m.labelers.pretrained import PretrainedLabeler
    from four_m.labelers.registry import LABELERS

    for task, checkpoint, flag in (
        ("normal", args.omnidata, "--omnidata"),
        ("depth", args.omnidata_depth, "--omnidata-depth"),
    ):
        if not checkpoint:
            continue
        from four_m.labelers.omnidata import convert_checkpoint

        target = config.label.labeler(task).model
        if target is None or Path(target).exists():
            raise UserError(
                f"{flag} converts into label.{task}.model, which must name a folder not there yet (it is {target})"
            )
        print(f"models: {task}: {checkpoint} -> {convert_checkpoint(Path(checkpoint), Path(target), task)} (converted)")
    failed = 0
    for name in config.label.labelers:
        cfg = config.label.labeler(name)
        if not issubclass(LABELERS[name], PretrainedLabeler):
            print(f"models: {name}: an algorithm, no weights (nothing to fetch)")
            continue
        if cfg.model is None:
            print(f"models: {name}: tiny random-init variant (nothing to fetch)")
            continue
        try:
            manifest = LABELERS[name](cfg, config.label.size, None, location(config.root)).record_weights()
            print(f"models: {name}: {manifest.line()}")
        except Exception as err:  # noqa: BLE001 - one line per labeler, then the exit status says it
            failed += 1
            at = f" at {cfg.revision}" if cfg.revision else ""
            print(f"models: {name}: cannot fetch {cfg.model}{at}: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


def _dryrun(config: Config, args: argparse.Namespace) -> int:
    """The production config at full size with random weights on this CPU, then its cost table."""
    from four_m.core.dataset_root import write_text_atomic
    from four_m.core.storage import location
    from four_m.pipeline.dryrun import DRY_ROOT, FORMULA, dry_run_config, measure, report

    dry = dry_run_config(config, args.root or DRY_ROOT)
    check_root_writable(dry.root)
    status = max(VERBS[verb].run(dry, _with_defaults(verb, args)) for verb in DRY_RUN)
    table = report(measure(dry, config))
    out = location(dry.root) / "dryrun.md"
    write_text_atomic(out, f"# Dry run of {args.config}: production architectures, random weights\n\n{table}\n")
    print(table.replace(FORMULA, f"({FORMULA})"))
    print(f"dryrun: wrote {out}")
    return status


DRY_RUN = ("download", "label", "tokenizers", "tokenize", "train")
"""The verbs ``dryrun`` runs on the dry-run config before measuring."""


def _unchanged(config: Config) -> Config:
    return config


PIPELINE = (
    "download",
    "curate",
    "label",
    "curate",
    "curate-report",
    "preview",
    "tokenizers",
    "tokenize",
    "preview-tokens",
    "train",
    "sample",
    "eval",
)
DEMO: tuple[tuple[str, Callable[[Config], Config]], ...] = (
    *((verb, _unchanged) for verb in PIPELINE),
    ("finetune", _unchanged),
    ("eval", Config.finetuned),  # the fine-tuned run, on its task
    ("probe", _unchanged),
    ("card", _unchanged),
    ("verify", _unchanged),
)
"""The verbs ``demo`` runs, in this order, each with the config it reads: every stage of the
pipeline, then the fine-tune of the trained run (``finetune``), scored, and its encoder probed;
last, every file written checked against its marker (about a second: docs/dataset-root.md)."""


def _demo(config: Config, args: argparse.Namespace) -> int:
    """Every stage in turn, each with its own options at their defaults; a failing stage does not
    stop the later ones (each reports itself), the exit status is the worst of them."""
    return max(VERBS[verb].run(view(config), _with_defaults(verb, args)) for verb, view in DEMO)


def _with_defaults(verb: str, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` plus ``verb``'s own options at their defaults: what another verb passes it."""
    parser = argparse.ArgumentParser(add_help=False)
    for add in VERBS[verb].options:
        add(parser)
    return argparse.Namespace(**{**vars(args), **vars(parser.parse_args([]))})


def _report(summary: StageSummary) -> int:
    print(summary.line())
    for shard, error in sorted(summary.shards_failed.items()):
        print(f"  shard {shard:05d} failed: {error}", file=sys.stderr)
    return 1 if summary.shards_failed else 0


Options = Callable[[argparse.ArgumentParser], None]
"""Adds one verb's own options to its subcommand's parser."""


def _common(parser: argparse.ArgumentParser) -> None:
    """The options every verb takes: which config, which root, overrides, and how to run."""
    parser.add_argument("--config", default="default", help="YAML file, or a name in configs/ (default)")
    parser.add_argument("--root", help="dataset root (default: the config's root)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set download.image_size=384 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="remove every stage lock of the root first: only when the run holding one is known to be gone",
    )


def _only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", metavar="NAMES", help="run only these labelers, e.g. depth,det (others untouched)")


def _retry_failed(parser: argparse.ArgumentParser) -> None:
    help_ = "re-fetch only the failed rows of finished shards, merged into place"
    parser.add_argument("--retry-failed", action="store_true", help=help_)


def _omnidata(parser: argparse.ArgumentParser) -> None:
    help_ = "convert Omnidata's DPT-Hybrid normal checkpoint (.ckpt) into label.normal.model first"
    parser.add_argument("--omnidata", metavar="CKPT", help=help_)
    help_ = "convert Omnidata's DPT-Hybrid depth checkpoint (.ckpt) into label.depth.model first"
    parser.add_argument("--omnidata-depth", metavar="CKPT", help=help_)


def _samples(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=8, help="rows in the grid (default 8)")


def _source(parser: argparse.ArgumentParser) -> None:
    help_ = "an ml-4m model: a folder with config.json and model.safetensors, or a hub id (EPFL-VILAB/4M-7_B_CC12M)"
    parser.add_argument("--source", help=help_)
    leave = "ml-4m modality names to convert without, comma-separated (4M-21's t5_caption,human_poses,...)"
    parser.add_argument("--leave-out", help=leave)
    help_ = "replace runs/<train.run> if it exists, all of it (without: an existing run is refused)"
    parser.add_argument("--replace", action="store_true", help=help_)


def _user_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="generate from this image file instead of the held-out shards")
    parser.add_argument("--caption", help="generate from this caption (with caption in generate.given: FROM=caption)")


@dataclass(frozen=True)
class Verb:
    """One subcommand: the function that runs it, its line in ``--help``, and the options only it takes."""

    run: Callable[[Config, argparse.Namespace], int]
    help: str
    options: tuple[Options, ...] = ()
    writes_root: bool = True
    """False for a verb that writes nothing under the root; every other one is refused up front on
    a root that cannot take output (``check_root_writable``)."""


VERBS: dict[str, Verb] = {
    "sample-urls": Verb(_sample_urls, "write the embedded sample's url list (<root>/urls/sample.tsv)"),
    "download": Verb(_download, "url lists -> images/ with img2dataset on Ray", (_retry_failed,)),
    "curate": Verb(
        _curate, "dedup and filter -> curation/decisions/ (image filters before labelling, label filters after)"
    ),
    "curate-report": Verb(_curate_report, "<root>/curation/report/: each score's histogram and the removed rows"),
    "label": Verb(_label, "pseudo-labels -> labels/<modality>/", (_only,)),
    "preview": Verb(_preview, "<root>/preview/labels.png: a few images with every label", (_samples,)),
    "tokenizers": Verb(_tokenizers, "train one tokenizer per modality -> tokenizers/<modality>/"),
    "tokenize": Verb(_tokenize, "images + labels -> tokens/<modality>/"),
    "preview-tokens": Verb(
        _preview_tokens, "<root>/preview/tokens.png: each modality as labelled and decoded from its tokens", (_samples,)
    ),
    "train": Verb(_train, "train a 4M model on tokens/ -> runs/<run>/"),
    "finetune": Verb(_finetune, "train runs/<train.run>/ from runs/<finetune.from_run>/'s weights (FROM_RUN=)"),
    "sample": Verb(_sample, "runs/<run>/samples/*.png: predictions from held-out rows or your input", (_user_input,)),
    "eval": Verb(_eval, "runs/<run>/eval/metrics.md: rgb -> each modality (or the run's task) on the held-out shards"),
    "import-4m": Verb(_import_4m, "runs/<train.run>/ from a released apple/ml-4m model (--source)", (_source,)),
    "probe": Verb(_probe, "runs/<run>/probe/<target>.md: the run's encoder as a backbone, a dense head on a label"),
    "card": Verb(_card, "<root>/README.md: the Hugging Face dataset card of the root"),
    "verify": Verb(
        _verify,
        "check every file of the root against its marker (size, sha256); exit 1 naming each one that does not",
        writes_root=False,  # it only reads: a read-only root can be verified
    ),
    "models": Verb(
        _models,
        "fetch the configured labelers' production weights (--omnidata[-depth]: convert Omnidata's)",
        (_omnidata,),
    ),
    "bad-input": Verb(_bad_input, "the bad-input corpus through every stage in <root>/_bad_input/, audited"),
    "demo": Verb(_demo, f"every stage in order: {', '.join(verb for verb, _ in DEMO)}"),
    "dryrun": Verb(
        _dryrun,
        "the config's production architectures at full size, random weights, on this CPU, with a cost table",
        writes_root=False,  # it writes only the dry run's own root (--root, default data/dryrun)
    ),
}
"""The verbs, in the order ``--help`` lists them: the one list of them."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The verb and its options. An option the verb does not take is refused by the verb's own
    parser (exit 2), whose usage line then shows what it does take."""
    parser = argparse.ArgumentParser(
        prog="python -m four_m", description="A verb per stage; `python -m four_m VERB --help` lists its options."
    )
    common = argparse.ArgumentParser(add_help=False)
    _common(common)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    subcommands: dict[str, argparse.ArgumentParser] = {}
    for name, verb in VERBS.items():
        subcommands[name] = verbs.add_parser(name, parents=[common], help=verb.help, description=verb.help)
        for add in verb.options:
            add(subcommands[name])
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subcommands[args.verb].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is logged (as logging's last resort is),
    so the handler of a first ``main()`` never writes to a stream replaced since (tests, notebooks)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.WARNING)
        self.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))

    @property
    def stream(self) -> TextIO:  # read by logging.StreamHandler on every line
        return sys.stderr


def _log_warnings_to_stderr() -> None:
    """Show the stages' warnings as they happen (a batch retried row by row, a shard that failed).

    Library code only logs; this is the one place that gives ``four_m``'s loggers a handler. Ray's and
    Lightning's loggers keep their own handlers and do not propagate here, so nothing is printed twice.
    """
    logger = logging.getLogger("four_m")
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        logger.addHandler(_Stderr())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    verb = VERBS[args.verb]
    _log_warnings_to_stderr()
    try:
        config = load_config(args.config, args.overrides, root=args.root)
        if verb.writes_root:
            check_root_writable(config.root)
        if args.force_unlock:
            for removed in force_unlock(location(config.root)):
                print(f"four_m {args.verb}: removed the lock of {removed}", file=sys.stderr)
        return verb.run(config, args)
    except UserError as err:
        print(f"four_m {args.verb}: error: {err}", file=sys.stderr)
        return 2
