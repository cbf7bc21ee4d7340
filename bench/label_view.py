"""Disk cost per image of the label view's size: the demo's 256 px against production's 580 px, in one run.

Crops (``docs/crops.md``) are cut from the label view, the centred square of the shorter side at
``label.size``; production stores it at 580 px so that 4M's smallest crop (area 0.2, aspect 3/4)
keeps 224 px, the demo at 256 px. This prints what that costs on disk per image: the JPEG as the
download stage stores it (shorter side = the label view's side, quality 95) and every label file of
the label stage, per modality, at each side, and the ratio.

The label stage is the real one with the configured labelers: by default the tiny random-init
networks (their maps are smoother than real ones, so real depth and normal PNGs compress less) and
the real algorithms (Canny edges, palettes, metadata), whose labels are real at any size.

    .venv/bin/python bench/label_view.py [--images 16] [--sides 256 580] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import make_images, write_images_root

from four_m.core.config import load_config
from four_m.core.modalities import MODALITIES
from four_m.pipeline.label import run_label


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def label_bytes(photos: list[Path], side: int, work: Path, overrides: list[str]) -> dict[str, float]:
    """Bytes per image of ``images/`` and of each ``labels/<modality>/`` at a label view of ``side`` px."""
    root = work / f"root{side}"
    jpegs = write_images_root(root, photos, per_shard=len(photos), shorter_side=side)
    config = load_config("default", [f"label.size={side}", *overrides], root=str(root))
    summary = run_label(config, progress=False)
    failed = {n: dict(c) for n, c in summary.failures.items() if c}
    if failed:
        print(f"  side {side}: failed rows {failed}")
    per_image = {"images (JPEG)": sum(map(len, jpegs)) / len(jpegs)}
    for name in config.label.labelers:
        per_image[name] = folder_bytes(root / f"labels/{name}") / len(jpegs)
    return per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 580])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        photos = [work / "photos" / n for n in make_images(work / "photos", args.images)]
        costs = {side: label_bytes(photos, side, work, args.overrides) for side in args.sides}
    first, *rest = args.sides
    sides = " vs ".join(map(str, args.sides))
    print(f"bytes per image on disk, {args.images} CC12M-like photos, label view at {sides} px")
    print(f"  {'':24s}" + "".join(f"{side:>10d} px" for side in args.sides) + "".join(f"  {s}/{first}" for s in rest))
    names = list(costs[first])
    for name in [*names, "total"]:
        values = [sum(c.values()) if name == "total" else c[name] for c in costs.values()]
        kind = f" ({MODALITIES[name].kind})" if name in MODALITIES else ""
        ratios = "".join(f"  {v / values[0]:6.2f}x" if values[0] else "       -" for v in values[1:])
        print(f"  {name + kind:24s}" + "".join(f"{v / 1024:10.1f} KB" for v in values) + ratios)


if __name__ == "__main__":
    main()
