"""``python -m four_m <verb> --config ... [--root ...] [--set section.key=value ...]``: a verb per stage.

Verbs of stages that are not built yet fail with one line, never a silent success. Expected
problems (a bad config, a malformed url list, a busy port) end with one line too, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from four_m.core.config import Config, load_config
from four_m.core.errors import UserError
from four_m.core.summary import StageSummary

NOT_BUILT = {
    "label": "the pseudo-labelers",
    "tokenizers": "tokenizer training",
    "tokenize": "the token store",
    "train": "the 4M trainer",
    "sample": "generation",
    "card": "dataset cards",
    "preview": "token previews",
}


def _sample_urls(config: Config, progress: bool) -> int:
    from four_m.core.dataset_root import DatasetRoot
    from four_m.pipeline.sample_site import build_sample

    print(f"sample-urls: wrote {build_sample(DatasetRoot(config.root), config.sample)}")
    return 0


def _download(config: Config, progress: bool) -> int:
    from four_m.pipeline.download import run_download

    return _report(run_download(config, progress=progress))


def _demo(config: Config, progress: bool) -> int:
    status = _download(config, progress)
    print(f"demo: stages not built yet, skipped: {', '.join(NOT_BUILT)}")
    return status


def _report(summary: StageSummary) -> int:
    print(summary.line())
    for shard, error in sorted(summary.shards_failed.items()):
        print(f"  shard {shard:05d} failed: {error}", file=sys.stderr)
    return 1 if summary.shards_failed else 0


VERBS: dict[str, Callable[[Config, bool], int]] = {
    "sample-urls": _sample_urls,
    "download": _download,
    "demo": _demo,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m four_m", description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=[*VERBS, *NOT_BUILT])
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb in NOT_BUILT:
        print(
            f"four_m {args.verb}: not built yet ({NOT_BUILT[args.verb]} come in a later stage)",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(args.config, args.overrides, root=args.root)
        return VERBS[args.verb](config, not args.no_progress)
    except UserError as err:
        print(f"four_m {args.verb}: error: {err}", file=sys.stderr)
        return 2
