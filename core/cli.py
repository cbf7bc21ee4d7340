"""``python -m four_m <verb> --config ... [--root ...] [--set section.key=value ...]``: a verb per stage.

Expected problems (a bad config, a malformed url list, a busy port, a run that does not match the
tokenizers, a root that is a file or not writable) end with one line, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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


def _preview(config: Config, args: argparse.Namespace) -> int:
    from four_m.labelers.preview import write_label_preview

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
    from four_m.tokenize.preview import write_token_preview

    print(f"preview-tokens: wrote {write_token_preview(config, samples=args.samples)}")
    return 0


def _train(config: Config, args: argparse.Namespace) -> int:
    from four_m.train.run import run_train

    print("\n".join(run_train(config).lines()))
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


def _models(config: Config, args: argparse.Namespace) -> int:
    """Fetch production weights for the configured labelers (needs a reachable hub)."""
    from pathlib import Path

    from four_m.labelers.registry import LABELERS

    failed = 0
    for name in config.label.labelers:
        cfg = config.label.labeler(name)
        if cfg.model is None or Path(cfg.model).exists():
            print(f"models: {name}: {cfg.model or 'tiny random-init variant'} (nothing to fetch)")
            continue
        try:
            print(f"models: {name}: {cfg.model} -> {LABELERS[name](cfg, config.label.size).fetch()}")
        except Exception as err:  # noqa: BLE001 - one line per labeler, then the exit status says it
            failed += 1
            print(f"models: {name}: cannot fetch {cfg.model}: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


def _demo(config: Config, args: argparse.Namespace) -> int:
    status = _download(config, args)
    status = max(status, _label(config, args))
    _preview(config, args)
    status = max(status, _tokenizers(config, args))
    status = max(status, _tokenize(config, args))
    _preview_tokens(config, args)
    status = max(status, _train(config, args))
    status = max(status, _sample(config, args))
    status = max(status, _eval(config, args))
    return max(status, _card(config, args))


def _report(summary: StageSummary) -> int:
    print(summary.line())
    for shard, error in sorted(summary.shards_failed.items()):
        print(f"  shard {shard:05d} failed: {error}", file=sys.stderr)
    return 1 if summary.shards_failed else 0


VERBS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "sample-urls": _sample_urls,
    "download": _download,
    "label": _label,
    "preview": _preview,
    "tokenizers": _tokenizers,
    "tokenize": _tokenize,
    "preview-tokens": _preview_tokens,
    "train": _train,
    "sample": _sample,
    "eval": _eval,
    "card": _card,
    "models": _models,
    "bad-input": _bad_input,
    "demo": _demo,
}
LEAVES_ROOT_ALONE = frozenset({"models"})
"""Verbs that write nothing under the root (weights go to the hub's cache); every other one is
refused up front on a root that cannot take output (``check_root_writable``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m four_m", description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=list(VERBS))
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
    parser.add_argument("--only", help="label: run only these labelers, e.g. depth,det (others untouched)")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="download: re-fetch only the failed rows of finished shards, merged into place",
    )
    parser.add_argument("--samples", type=int, default=8, help="preview: rows in the grid")
    parser.add_argument("--image", help="sample: generate from this image file instead of the held-out shards")
    parser.add_argument("--caption", help="sample: generate from this caption (with FROM=caption)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, root=args.root)
        if args.verb not in LEAVES_ROOT_ALONE:
            check_root_writable(config.root)
        if args.force_unlock:
            for removed in force_unlock(location(config.root)):
                print(f"four_m {args.verb}: removed the lock of {removed}", file=sys.stderr)
        return VERBS[args.verb](config, args)
    except UserError as err:
        print(f"four_m {args.verb}: error: {err}", file=sys.stderr)
        return 2
