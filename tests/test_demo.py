"""`python -m four_m demo` end to end on the embedded sample: real server, real Ray, every built stage."""

import socket
import subprocess
import sys

import pyarrow.parquet as pq
from PIL import Image

from four_m.core.config import load_config
from four_m.core.modalities import MODALITIES, labelled_modalities, map_modalities, token_modalities

DEMO = load_config("default")
VIEW, CROP, CROPS = DEMO.label.size, DEMO.tokenize.crops.size, DEMO.tokenize.crops.n_crops


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_demo_runs_every_stage_on_the_embedded_sample(tmp_path):
    root = tmp_path / "root"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "four_m",
            "demo",
            "--root",
            str(root),
            "--set",
            f"sample.port={_free_port()}",
            *[
                arg for m in map_modalities() for arg in ("--set", f"tokenize.{m}.steps=6")
            ],  # training itself is tested elsewhere
            *("--set", "train.model=nano", "--set", "train.max_steps=12", "--set", "train.warmup_steps=2"),
            *("--set", "generate.max_tokens=12", "--set", "generate.steps=4"),
            *("--set", "finetune.train.max_steps=4", "--set", "finetune.train.warmup_steps=1"),
            *("--set", "probe.steps=5"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Ten photos, four planted copies of them, four planted failures.
    assert "download: rows in 18, rows out 14, failed 4" in run.stdout
    # Curation, before labelling: the four copies found, one of them by its bytes.
    removed = "removed 4 (exact_duplicate: 1, near_duplicate: 3); 4 removed before labelling"
    assert f"curate: rows 18, kept 14, {removed}" in run.stdout
    assert "curate/clip_score: waiting for its labels" in run.stdout  # the first run
    assert "curate/clip_score: scored 10, not scored 8" in run.stdout  # the second, after label
    assert (root / "curation/report/removed.png").is_file()
    images = [pq.read_table(p) for p in sorted((root / "images").glob("*.parquet"))]
    curated = "curated_exact_duplicate: 1, curated_near_duplicate: 3"
    for name in labelled_modalities():
        assert f"label/{name}: rows 18, labelled 10, failed 8 ({curated}, no_image: 4)" in run.stdout
        labels = [pq.read_table(root / f"labels/{name}/{p.name}") for p in sorted((root / "images").glob("*.parquet"))]
        assert [t["key"].to_pylist() for t in labels] == [t["key"].to_pylist() for t in images]
    preview = Image.open(root / "preview/labels.png")
    assert preview.width == VIEW * (1 + len(labelled_modalities())) and preview.height > VIEW * 8
    for name in token_modalities():
        absent = 0 if name == "caption" else 4  # the alt-text of a failed download still exists
        assert f"tokenize/{name}: rows in 18, rows out {18 - 4 - absent}" in run.stdout
        tokens = [pq.read_table(root / f"tokens/{name}/{p.name}") for p in sorted((root / "images").glob("*.parquet"))]
        assert [t["key"].to_pylist() for t in tokens] == [t["key"].to_pylist() for t in images]
        if MODALITIES[name].cropped:  # 4 crops per image (a demo setting), every map and the boxes
            crops = [c for t in tokens for c in t["crops"].to_pylist()]
            ids = [i for t in tokens for i in t["tokens"].to_pylist() if i is not None]
            assert CROPS == 4 and {len(c) for c in crops} == {len(i) for i in ids} == {CROPS}, name
    reconstructions = Image.open(root / "preview/tokens.png")
    assert reconstructions.width == CROP * 2 * len(token_modalities())
    assert Image.open(root / "preview/crops.png").width == CROP * CROPS
    assert f"train: 12 steps of any-to-any masking on {CROPS} crop(s) per sample, loss " in run.stdout
    assert (root / "runs/tiny/loss.png").is_file() and (root / "runs/tiny/model.safetensors").is_file()
    targets = [m for m in token_modalities() if m != "rgb"]
    grid = Image.open(root / f"runs/tiny/samples/rgb-to-{'+'.join(targets)}.png")
    assert grid.width == CROP * (1 + 2 * len(targets))
    assert "eval: " in run.stdout and "| depth | abs_rel |" in run.stdout
    assert "| canny_edge | edge_f1 |" in run.stdout and "| color_palette | delta_e |" in run.stdout
    assert (root / "runs/tiny/eval/metrics.json").is_file() and (root / "README.md").is_file()
    # The fine-tune of the demo's config: run tiny on the task rgb_pixels -> canny_edge, then scored on it.
    run_name, task = DEMO.finetune.train["run"], "rgb_pixels -> canny_edge"
    assert f"train: 4 steps of task {task} (inputs whole, targets whole)" in run.stdout
    assert f"eval: 2 held-out rows with rgb_pixels, {task} (greedy decoding)" in run.stdout
    # Last, every file the stages wrote holds against its marker, the fine-tuned run's model too.
    assert f"verify: {root}: " in run.stdout and run.stdout.rstrip().endswith(": all hold"), run.stdout[-2000:]
    assert f"verify: train/{run_name}: 1 marker, 2 files, " in run.stdout
    assert (root / f"runs/{run_name}/eval/metrics.json").is_file()
    assert "probe: semseg from run tiny's encoder (linear probe, frozen encoder, 5 steps)" in run.stdout
    assert (root / "runs/tiny/probe/semseg.json").is_file()
