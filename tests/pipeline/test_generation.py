"""``make sample`` and ``make eval`` on a run trained for real on the pipeline's token store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from four_m.core.config import ConfigError, load_config
from four_m.core.modalities import token_modalities
from four_m.train.evaluate import run_eval
from four_m.train.held_out import NothingHeldOutError
from four_m.train.run import run_train
from four_m.train.sample import SampleInputError, write_samples
from four_m.train.trained import RunMismatchError

SIZE = 64  # the labelled root's label.size
RUN = [
    "train.model=nano",
    "train.batch_size=4",
    "train.input_budget=24",
    "train.target_budget=24",
    "train.max_steps=3",
    "train.warmup_steps=1",
    "train.holdout_shards=1",
    "generate.steps=3",
    "generate.max_tokens=6",
]


def _config(root: Path, *extra: str):
    return load_config("default", [f"label.size={SIZE}", "ray.num_cpus=2", *RUN, *extra], root=str(root))


@pytest.fixture(scope="module")
def trained(tokenized, tmp_path_factory) -> Path:
    """A copy of the tokenized root with a nano run trained on all but its last shard."""
    config, _, _, _ = tokenized
    root = tmp_path_factory.mktemp("generation") / "root"
    shutil.copytree(config.root, root)
    run_train(_config(root))
    return root


def test_sample_writes_inputs_pseudo_labels_and_predictions_of_held_out_rows(trained):
    out = write_samples(_config(trained, "generate.targets=[depth,caption,det]", "generate.samples=5"))
    grid = Image.open(out)
    assert out.name == "rgb-to-depth+caption+det.png"
    # rgb | depth label | depth predicted | caption label | caption predicted | det label | det predicted;
    # the held-out shard (the last of three) has two rows with an image, fewer than the 5 asked for.
    assert grid.size == (7 * SIZE, 18 + 2 * SIZE)


def test_sample_shows_the_pixels_and_can_ask_for_rgb_tokens_and_in_paint(trained):
    """The run has rgb_pixels: FROM=rgb_pixels is the photo, so rgb's own tokens can be a target;
    KEEP gives half of depth's stored tokens."""
    config = _config(trained, "generate.given=[rgb_pixels]", "generate.targets=[rgb,depth]", "generate.keep.depth=0.5")
    out = write_samples(config)
    assert out.name == "rgb-to-rgb+depth.png"
    assert Image.open(out).size == (5 * SIZE, 18 + 2 * SIZE)


def test_sample_from_a_user_image_and_caption(trained, photos):
    image = photos[0][0]
    config = _config(trained, "generate.given=[rgb,caption]", "generate.targets=[depth]")
    grid = Image.open(write_samples(config, image=Path(image), caption="a bus on a street"))
    assert grid.size == (4 * SIZE, 18 + SIZE)


def test_bad_requests_fail_with_one_clear_line(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"generate.targets: \['rgb'\] also given"):
        _config(trained, "generate.given=[rgb]", "generate.targets=[rgb]")
    with pytest.raises(SampleInputError, match=r"generate.targets: \['rgb'\] also given"):
        write_samples(_config(trained, "generate.targets=[rgb]"))  # given by default: the image
    with pytest.raises(ConfigError, match="generate.given: unknown \\['lidar'\\]"):
        _config(trained, "generate.given=[lidar]")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    command = ["sample", "--root", str(trained), "--set", f"label.size={SIZE}", "--image", str(broken)]
    run = subprocess.run(
        [sys.executable, "-m", "four_m", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and f"cannot use image {broken}" in run.stderr
    assert run.stderr.strip().count("\n") == 0


def test_a_run_whose_tokenizers_were_retrained_is_refused(trained, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(trained, root)
    described = root / "runs/tiny/model.json"
    spec = json.loads(described.read_text())
    spec["tokenizers"]["depth"] = "depth-0123456789ab"  # as if tokenizers/depth changed after training
    described.write_text(json.dumps(spec))
    with pytest.raises(RunMismatchError, match="depth: run tiny was trained on tokenizer depth-0123456789ab"):
        write_samples(_config(root))


def test_eval_scores_rgb_to_every_modality_beside_baseline_and_tokenizer_ceiling(trained):
    report = run_eval(_config(trained))
    assert report.shown == ("rgb_pixels",)  # the run has the pixel input: eval conditions on the photo
    figures = json.loads((trained / "runs/tiny/eval/metrics.json").read_text())
    assert figures["columns"] == ["baseline", "model", "tokenizer ceiling"] and figures["rows"] == 2
    results = figures["results"]
    assert set(results) == {m for m in token_modalities() if m != "rgb"}
    # The stored caption, palette and metadata tokens are the label's own, losslessly: the ceiling is exact.
    assert results["caption"]["token_accuracy"]["tokenizer ceiling"] == 1.0
    assert results["color_palette"]["delta_e"]["tokenizer ceiling"] == 0.0
    assert results["metadata"]["bin_accuracy"]["tokenizer ceiling"] == 1.0
    assert 0 <= results["canny_edge"]["edge_f1"]["model"] <= 1
    assert 0 <= results["color_palette"]["well_formed"]["model"] <= 1
    assert 0 <= results["depth"]["abs_rel"]["model"] and 0 <= results["semseg"]["miou"]["model"] <= 1
    assert "| depth | abs_rel |" in report.table and (trained / "runs/tiny/eval/metrics.md").is_file()


def test_eval_needs_a_held_out_shard(trained):
    with pytest.raises(NothingHeldOutError, match="train.holdout_shards is 0"):
        run_eval(_config(trained, "train.holdout_shards=0"))
