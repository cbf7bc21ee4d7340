"""Curation against no curation: labelling compute saved on a corpus with planted duplicates, and
the curate stage's throughput next to download's, in one run.

A corpus of N distinct images (``bench/scale.py``'s generator: crops, flips, colour and scale
changes of the bundled photos, every two at least ``APART`` bits apart by dHash, so that a
near-duplicate search at the default 6 bits has nothing to find among them) plus planted copies of a share of
them (the same file, re-encoded at quality 60, resized to 70 %, cropped by 3 %: the embedded
sample's kinds) at other urls, served on 127.0.0.1; downloaded once, then labelled twice, by the
same labelers: on a copy curated first (the image filters) and on a copy not curated. Prints the
rows each labelled, the seconds, the planted copies found, the distinct images removed by mistake,
and images/s of download and of the image filters.

    .venv/bin/python bench/curate.py [--size 1000] [--copies 0.25]
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from scale import make_corpus, served  # noqa: E402

KINDS = ("exact", "reencoded", "resized", "cropped")
APART = 16


def plant(folder: Path, corpus: list[tuple[str, str]], share: float, seed: int = 0) -> list[tuple[str, str, str]]:
    """Copies of ``share`` of the corpus, one kind each in turn: (copy name, original name, caption)."""
    rng = random.Random(seed)
    chosen = rng.sample(corpus, int(len(corpus) * share))
    copies = []
    for number, (name, caption) in enumerate(chosen):
        kind = KINDS[number % len(KINDS)]
        data = (folder / name).read_bytes()
        if kind != "exact":
            image = Image.open(io.BytesIO(data)).convert("RGB")
            width, height = image.size
            if kind == "resized":
                image = image.resize((width * 7 // 10, height * 7 // 10), Image.Resampling.LANCZOS)
            elif kind == "cropped":
                dx, dy = width * 3 // 100, height * 3 // 100
                image = image.crop((dx, dy, width - dx, height - dy))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=60 if kind == "reencoded" else 90)
            data = out.getvalue()
        copy = f"copy_{kind}_{name}"
        (folder / copy).write_bytes(data)
        copies.append((copy, name, caption))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000, help="distinct images")
    parser.add_argument("--copies", type=float, default=0.25, help="planted copies, as a share of the distinct images")
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "four_m-curate-bench")
    args = parser.parse_args()

    from four_m.core.config import load_config
    from four_m.core.curation import removed_rows
    from four_m.core.dataset_root import DatasetRoot
    from four_m.pipeline.curate import run_curate
    from four_m.pipeline.download import run_download
    from four_m.pipeline.executor import ray_session
    from four_m.pipeline.label import run_label

    corpus_folder = args.work / f"corpus-apart-{APART}"
    corpus = make_corpus(corpus_folder, args.size, apart=APART)
    copies = plant(corpus_folder, corpus, args.copies)
    rows = [*corpus, *((copy, caption) for copy, _, caption in copies)]
    random.Random(1).shuffle(rows)  # copies spread over the shards, not at the end
    url_list = args.work / "urls.tsv"
    for old in ("curated", "plain"):
        shutil.rmtree(args.work / old, ignore_errors=True)
    overrides = [
        "sample.enabled=false",
        f"download.samples_per_shard={args.per_shard}",
        "curate.filters=[exact_duplicate,near_duplicate,min_size,aspect_ratio]",
    ]
    with served(corpus_folder) as base:
        url_list.write_text("".join(f"{base}/{name}\t{caption}\n" for name, caption in rows))
        curated = load_config("default", [*overrides, f"download.urls={url_list}"], root=str(args.work / "curated"))
        with ray_session(curated.ray):
            started = time.perf_counter()
            downloaded = run_download(curated, progress=False)
            download_s = time.perf_counter() - started
            shutil.copytree(args.work / "curated", args.work / "plain")
            plain = load_config("default", [*overrides, f"download.urls={url_list}"], root=str(args.work / "plain"))
            curation = run_curate(curated, progress=False)
            with_curation = run_label(curated, progress=False)
            without = run_label(plain, progress=False)
    root = DatasetRoot(curated.root)
    removed: dict[str, str] = {}
    for shard in range(len(list((args.work / "curated/images").glob("*.parquet")))):
        removed.update(removed_rows(root, shard))
    urls = {}
    for file in sorted((args.work / "curated/images").glob("*.parquet")):
        table = pq.read_table(file, columns=["key", "url"])
        urls.update(zip(table["key"].to_pylist(), table["url"].to_pylist(), strict=True))
    key_of = {u.rsplit("/", 1)[-1]: k for k, u in urls.items()}
    pairs = [(key_of[copy], key_of[original]) for copy, original, _ in copies]
    # A planted pair is resolved when exactly one of the two goes (which one: the most pixels, then
    # the smaller key; the shuffled list puts a copy first as often as not).
    kinds = [copy.split("_", 2)[1] for copy, _, _ in copies]
    resolved = Counter(kind for kind, (a, b) in zip(kinds, pairs, strict=True) if (a in removed) != (b in removed))
    in_pairs = {k for pair in pairs for k in pair}
    outside = Counter(error.split(" ", 3)[3].split(" ", 1)[0] for k, error in removed.items() if k not in in_pairs)
    labelled_with, labelled_without = sum(with_curation.labelled.values()), sum(without.labelled.values())
    kinds = ", ".join(KINDS)
    print(f"corpus: {args.size} distinct images + {len(copies)} planted copies ({kinds}), {len(rows)} urls")
    speed = downloaded.rows_out / download_s
    print(f"download: {downloaded.rows_out} images in {download_s:.1f} s = {speed:.1f} images/s")
    scored, scoring_s = curation.scored_rows.get("image", 0), curation.score_seconds.get("image", 0.0)
    print(
        f"curate (image filters): {scored} images scored in {scoring_s:.1f} s = {scored / scoring_s:.1f} images/s;"
        f" whole stage {curation.seconds:.1f} s ({curation.rows / curation.seconds:.1f} images/s)"
    )
    by_kind = ", ".join(f"{kind} {resolved[kind]} of {kinds.count(kind)}" for kind in KINDS)
    print(f"planted pairs resolved (one of the two removed): {sum(resolved.values())} of {len(pairs)} ({by_kind})")
    print(f"distinct images removed (in no planted pair), by filter: {dict(outside) or 'none'}")
    print("| | labelled (image, labeler) rows | label seconds |")
    print("|---|---|---|")
    print(f"| not curated | {labelled_without} | {without.seconds:.1f} |")
    print(f"| curated first | {labelled_with} | {with_curation.seconds:.1f} |")
    saved = 1 - labelled_with / labelled_without
    seconds_saved = 1 - with_curation.seconds / without.seconds
    print(
        f"labelling saved: {saved:.1%} of labelled rows, {seconds_saved:.1%} of label seconds; at production"
        f" size (10.6 TFLOP per image, docs/cc12m.md) {saved * 10.6:.2f} TFLOP per downloaded image"
    )


if __name__ == "__main__":
    main()
