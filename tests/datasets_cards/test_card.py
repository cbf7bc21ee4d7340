"""Dataset cards of roots where only the download has run, of bad roots, and the CC12M template.

The fully labelled and tokenized root's card is tested in ``tests/pipeline/test_card.py``, beside
the session fixture that builds that root.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from four_m.cli import main
from four_m.core.config import AlgorithmConfig, Config, DownloadConfig, RayConfig, SampleConfig, load_config
from four_m.datasets_cards.card import TEMPLATES, render_card, write_card
from four_m.datasets_cards.stats import planned_stats
from four_m.pipeline.download import run_download

PLANTED = {
    "/missing.jpg": "http_404",
    "/not_an_image.jpg": "not_an_image",
    "file:///etc/hostname": "unsupported_scheme",
}
HUB_FIELDS = ("license", "pretty_name", "annotations_creators", "source_datasets", "task_categories", "configs")


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, ray_local, server, site) -> Config:
    """A root after a real download (planted failures included) and no other stage."""
    root = tmp_path_factory.mktemp("card") / "root"
    rows = [f"{server}/{p.name}\tphoto {p.stem}\n" for p in sorted(site.glob("0*"))[:5]]
    rows += [f"{url if '://' in url else server + url}\tplanted\n" for url in PLANTED]
    (root / "urls").mkdir(parents=True)
    (root / "urls/list.tsv").write_text("".join(rows))
    config = Config(
        root=str(root),
        ray=RayConfig(num_cpus=2),
        download=DownloadConfig(samples_per_shard=3, image_size=64, timeout_s=1.0, threads_per_shard=4),
        sample=SampleConfig(enabled=False),
        card=load_config("default").card,
    )
    summary = run_download(config, progress=False)
    assert summary.rows_in == len(rows) and not summary.shards_failed
    return config


def test_a_root_with_only_images_gets_a_card_whose_other_stages_are_not_run(downloaded):
    root = Path(downloaded.root)
    card = DatasetCard.load(write_card(downloaded))
    header = card.data.to_dict()
    assert all(header.get(f) for f in HUB_FIELDS), header
    assert header["annotations_creators"] == ["machine-generated"]
    assert header["license_name"] == downloaded.card.license_name
    assert [c["config_name"] for c in header["configs"]] == ["images"], "only folders with data are configs"
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (root / "images").glob("*.parquet"))
    (split,) = header["dataset_info"]["splits"]
    assert split["num_examples"] == rows
    assert "| download | `images/` | done |" in card.text
    for name in downloaded.label.labelers:
        assert f"| label/{name} | `labels/{name}/` | not run yet |" in card.text
    for name in downloaded.tokenize.modalities:
        assert f"| tokenize/{name} | `tokens/{name}/` | not run yet |" in card.text
        assert f"| {name} | not run yet |" in card.text.split("## Tokenizers")[1], "tokenizers not trained"
    assert "## Label statistics\n\nNot run yet." in card.text
    assert "## Training runs\n\nNot run yet" in card.text


def test_failure_reasons_on_the_card_are_those_of_the_shards_stats_files(downloaded):
    root = Path(downloaded.root)
    write_card(downloaded)
    recorded = Counter()
    for stats_file in (root / "images").glob("*_stats.json"):
        recorded.update(json.loads(stats_file.read_text())["failures"])
    assert recorded == Counter(PLANTED.values())
    stats = json.loads((root / "card/stats.json").read_text())
    assert stats["images"]["failures"] == dict(recorded)
    per_shard = {s["shard"]: s["failures"] for s in stats["images"]["shards"]}
    for stats_file in (root / "images").glob("*_stats.json"):
        shard = json.loads(stats_file.read_text())
        assert per_shard[shard["shard"]] == shard["failures"]
    text = (root / "README.md").read_text()
    for reason, n in recorded.items():
        assert f"| download | {reason} | {n} |" in text


def test_a_shard_without_its_marker_shows_as_partial(downloaded, tmp_path):
    root = tmp_path / "root"
    for folder in ("images", "_state/download"):
        shutil.copytree(Path(downloaded.root) / folder, root / folder)
    (root / "_state/download/00000.done.json").unlink()
    text = write_card(load_config("default", root=str(root))).read_text()
    shards = len(list((root / "images").glob("*.parquet")))
    assert f"| download | `images/` | partial: {shards - 1} of {shards} shards finished |" in text


@pytest.mark.parametrize("make_root", [False, True], ids=["missing", "empty"])
def test_a_root_without_images_is_a_one_line_error(tmp_path, capsys, make_root):
    root = tmp_path / "root"
    if make_root:
        (root / "images").mkdir(parents=True)
    assert main(["card", "--root", str(root)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("four_m card: error: ") and str(root) in error and "\n" not in error
    assert not (root / "README.md").exists()


def test_the_cc12m_template_is_what_make_card_renders_before_any_stage():
    config = load_config("cc12m")
    committed = (TEMPLATES / "cc12m/README.md").read_text()
    assert committed == render_card(planned_stats(config), config, {}), (
        "datasets_cards/cc12m/README.md is stale: regenerate it with .venv/bin/python -c"
        " \"from four_m.datasets_cards.card import write_template; write_template('cc12m')\""
    )
    header = DatasetCard(committed).data.to_dict()
    assert header["license"] == "other" and header["license_name"] and header["license_link"]
    assert all(header.get(f) for f in HUB_FIELDS)
    for name in config.label.labelers:
        model = config.label.labeler(name).model
        if isinstance(config.label.labeler(name), AlgorithmConfig):
            assert model is None and f"| {name} | not run yet (configured: an algorithm, no weights) |" in committed
            continue
        assert f"| `{model}` | {config.card.model_licenses[model]} |" in committed, model
