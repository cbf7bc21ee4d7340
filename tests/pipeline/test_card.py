"""The dataset card of a root the real stages made: labels, tokenizers, tokens, a preview, a run.

Its numbers are checked against the files and against what the stages reported while they ran.
(Cards of partial and bad roots: ``tests/datasets_cards/test_card.py``.)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from four_m.core.config import load_config
from four_m.datasets_cards.card import write_card
from four_m.tokenize.label_preview import write_label_preview
from four_m.tokenize.preview import write_token_preview
from four_m.train.run import run_train

NANO_RUN = ["train.model=nano", "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=4"]
NANO_RUN += ["train.input_budget=16", "train.target_budget=16", "train.log_every_n_steps=1", "train.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def carded(tmp_path_factory, tokenized):
    """A copy of the tokenized root with a label preview and a two-step run, then its card."""
    source, _, _, _ = tokenized
    root = tmp_path_factory.mktemp("carded") / "root"
    shutil.copytree(source.root, root)
    config = load_config("default", [f"label.size={source.label.size}", "ray.num_cpus=2", *NANO_RUN], root=str(root))
    # Shard 0 holds the fixture's undecodable "success" row: the previews leave it out.
    write_label_preview(config, samples=4, shard=0)
    write_token_preview(config, samples=4, shard=0)
    run_train(config)
    return config, write_card(config)


def test_previews_leave_out_an_image_that_does_not_decode(carded):
    config, _ = carded
    sizes = {"labels": config.label.size, "tokens": config.tokenize.crops.size}  # label view; crops' tiles
    for name, size in sizes.items():  # shard 0: three photos and one undecodable "success" row
        assert Image.open(Path(config.root) / f"preview/{name}.png").height == 18 + 3 * size


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))


def test_the_header_is_hub_metadata_with_the_real_row_counts(carded):
    config, path = carded
    root = Path(config.root)
    header = DatasetCard.load(path).data.to_dict()
    assert header["license"] == config.card.license and header["pretty_name"] == config.card.pretty_name
    assert header["annotations_creators"] == ["machine-generated"] and header["size_categories"] == ["n<1K"]
    assert {"depth-estimation", "object-detection", "image-segmentation"} <= set(header["task_categories"])
    folders = {c["config_name"]: c["data_files"][0]["path"].removesuffix("/*.parquet") for c in header["configs"]}
    expected = ["images", *(f"labels/{m}" for m in config.label.labelers)]
    assert sorted(folders.values()) == sorted(expected + [f"tokens/{m}" for m in config.tokenize.modalities])
    infos = {i["config_name"]: i for i in header["dataset_info"]}
    assert infos.keys() == folders.keys()
    for name, folder in folders.items():
        (split,) = infos[name]["splits"]
        assert split["num_examples"] == _rows(root / folder), name
        on_disk = sum(f.stat().st_size for f in (root / folder).glob("*.parquet"))
        assert infos[name]["download_size"] == on_disk, name


def test_hugging_face_datasets_loads_each_folder_as_a_config_of_the_root(carded, tmp_path):
    from datasets import load_dataset

    config, _ = carded
    for name, folder in (("tokens-depth", "tokens/depth"), ("labels-det", "labels/det")):
        dataset = load_dataset(config.root, name, split="train", cache_dir=str(tmp_path))  # checks num_examples
        assert dataset.num_rows == _rows(Path(config.root) / folder)
        images = sorted((Path(config.root) / "images").glob("*.parquet"))
        assert dataset["key"] == [k for f in images for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]


def test_failures_and_models_are_those_the_stages_reported(carded, labelled, tokenized):
    config, path = carded
    _, _, label_summary = labelled
    tokenize_summary = tokenized[3]
    text = path.read_text()
    stats = json.loads((Path(config.root) / "card/stats.json").read_text())
    expected = []
    for name in config.label.labelers:
        recorded = dict(label_summary.failures[name])
        assert stats["labels"][name]["files"]["failures"] == recorded, name
        expected += [f"| label/{name} | {reason} | {n} |" for reason, n in recorded.items()]
        if name in label_summary.random_init:
            assert stats["labels"][name]["model"] == "random-init"
            assert f"| {name} | `random-init` | `random-init` | {label_summary.labelled[name]} |" in text
        else:  # an algorithm over real inputs: its method stands where a model would
            method = stats["labels"][name]["model"]
            assert method.startswith(f"algorithmic ({name} ")
            assert f"| {name} | `{method}` | `-` | {label_summary.labelled[name]} |" in text
    for name, summary in tokenize_summary.modalities.items():
        assert stats["tokens"][name]["files"]["failures"] == dict(summary.failures), name
        expected += [f"| tokenize/{name} | {reason} | {n} |" for reason, n in summary.failures.items()]
    failures = text.split("## Failures by reason")[1].split("##")[0]
    shown = [line for line in failures.splitlines() if re.match(r"\| (label|tokenize)/", line)]
    assert sorted(shown) == sorted(expected)
    assert "Warning: " in text and "random-init models" in text


def test_label_statistics_add_up_over_the_sampled_rows(carded):
    config, _ = carded
    stats = json.loads((Path(config.root) / "card/stats.json").read_text())
    labels = stats["labels"]
    labelled = labels["semseg"]["files"]["rows_out"]
    assert labels["semseg"]["sampled_rows"] == labelled
    assert sum(labels["semseg"]["details"]["class_pixel_share"].values()) == pytest.approx(1, abs=1e-4)
    assert (
        sum(labels["depth"]["details"]["normalised_histogram"])
        == labels["depth"]["sampled_rows"] * config.label.size**2
    )
    det = pq.read_table(Path(config.root) / "labels/det", columns=["det"])["det"].to_pylist()
    assert labels["det"]["details"]["boxes"] == sum(len(row or []) for row in det)
    words = labels["caption"]["details"]["words"]["alt_text"]
    assert sum(words["histogram"].values()) == words["texts"] == labels["caption"]["sampled_rows"]
    for name, trained in stats["tokenizers"].items():
        recorded = json.loads((Path(config.root) / f"tokenizers/{name}/trained.json").read_text())
        assert trained["metrics"] == recorded["metrics"], name
    tokens = pq.read_table(Path(config.root) / "tokens/depth", columns=["tokens"])["tokens"].drop_null()
    used = len(np.unique(pc.list_flatten(pc.list_flatten(tokens))))  # every id of every crop
    assert stats["tokens"]["depth"]["crops_per_row"] == len(pc.list_flatten(tokens)) / len(tokens)  # every row
    assert stats["tokens"]["depth"]["ids_used"] == pytest.approx(
        used / stats["tokens"]["depth"]["vocab_size"], abs=1e-4
    )
    (run,) = stats["runs"]
    assert run["last_step"] >= 1 and run["loss_first"] > 0


def test_stats_rows_caps_what_the_statistics_read(carded, tmp_path):
    config, _ = carded
    root = tmp_path / "root"
    shutil.copytree(config.root, root, ignore=shutil.ignore_patterns("runs", "preview"))
    write_card(load_config("default", [f"label.size={config.label.size}", "card.stats_rows=3"], root=str(root)))
    stats = json.loads((root / "card/stats.json").read_text())
    assert {stats["labels"][m]["sampled_rows"] for m in ("depth", "semseg", "caption")} == {3}
    assert stats["labels"]["depth"]["files"]["rows"] == _rows(root / "labels/depth"), "counts cover every shard"


def test_every_embedded_picture_is_a_png_in_the_card_folder(carded):
    config, path = carded
    root = Path(config.root)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text())
    expected = {"semseg_classes", "depth_values", "caption_lengths", "codebook_usage", "preview_labels", "loss_tiny"}
    assert {Path(p).stem for p in linked} >= expected
    for relative in linked:
        assert relative.startswith("card/"), relative
        with Image.open(root / relative) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()
    assert sorted(p.name for p in (root / "card").glob("*.png")) == sorted(Path(p).name for p in linked)
