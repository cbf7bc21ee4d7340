import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from four_m.core.config import DownloadConfig
from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline.url_list import UrlListError, make_plan, read_shard_input, read_url_file

ROWS = [("http://a/1.jpg", 'a "quoted" caption'), ("http://a/2.jpg", "two"), ("https://b/3.png", "three")]


def _tsv(path, rows, header=False):
    lines = (["url\tcaption"] if header else []) + [f"{u}\t{c}" for u, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header", [False, True], ids=["cc12m-no-header", "header"])
def test_tsv_with_or_without_header(tmp_path, header):
    table, repaired = read_url_file(_tsv(tmp_path / "l.tsv", ROWS, header), DownloadConfig())
    assert table.to_pylist() == [{"url": u, "caption": c} for u, c in ROWS]
    assert repaired == 0


def test_gzipped_tsv_and_parquet(tmp_path):
    gz = tmp_path / "l.tsv.gz"
    gz.write_bytes(gzip.compress(_tsv(tmp_path / "x.tsv", ROWS).read_bytes()))
    pq.write_table(pa.table({"URL": [u for u, _ in ROWS], "TEXT": [c for _, c in ROWS]}), tmp_path / "l.parquet")
    cfg = DownloadConfig()
    assert read_url_file(gz, cfg)[0].num_rows == 3
    parquet = read_url_file(tmp_path / "l.parquet", DownloadConfig(url_col="URL", caption_col="TEXT"))[0]
    assert parquet["url"].to_pylist() == [u for u, _ in ROWS]


def test_missing_url_column_names_the_file(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"link": ["http://a"], "caption": ["c"]}), path)
    with pytest.raises(UrlListError, match=r"l\.parquet: no url column 'url' \(columns: link, caption\)"):
        read_url_file(path, DownloadConfig())


def test_unreadable_tsv_names_the_file(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("http://a/1.jpg\tone\nhttp://a/2.jpg\ttwo\textra\n")
    with pytest.raises(UrlListError, match=r"bad\.tsv: unreadable tsv"):
        read_url_file(path, DownloadConfig())


def test_non_utf8_caption_is_repaired_and_counted(tmp_path):
    path = tmp_path / "l.tsv"
    path.write_bytes(b"http://a/1.jpg\tcaf\xe9 latin-1\nhttp://a/2.jpg\tfine\n")
    table, repaired = read_url_file(path, DownloadConfig())
    assert repaired == 1
    assert table["caption"].to_pylist() == ["caf\ufffd latin-1", "fine"]


def test_plan_cuts_shards_keeps_order_and_is_reused(tmp_path):
    root = DatasetRoot(tmp_path)
    rows = [(f"http://h/{i}.jpg", f"c{i}") for i in range(7)]
    _tsv(root / "urls.tsv", rows)
    cfg = DownloadConfig(urls="urls.tsv", samples_per_shard=3)
    plan = make_plan(root, cfg)
    assert (plan.rows, plan.shards) == (7, 3)
    shards = [read_shard_input(root, s) for s in plan.shard_ids]
    assert [t.num_rows for t in shards] == [3, 3, 1]
    assert [u for t in shards for u in t["url"].to_pylist()] == [u for u, _ in rows]
    assert shards[1]["row_index"].to_pylist() == [0, 1, 2]
    assert make_plan(root, cfg) == plan


def test_a_moved_root_keeps_its_plan(tmp_path):
    (tmp_path / "a").mkdir()
    root = DatasetRoot(tmp_path / "a")
    _tsv(root / "urls.tsv", ROWS)
    cfg = DownloadConfig(urls="urls.tsv", samples_per_shard=2)
    plan = make_plan(root, cfg)
    (root / "_state/download/00000.done.json").write_text("{}")
    (tmp_path / "a").rename(tmp_path / "b")
    assert make_plan(DatasetRoot(tmp_path / "b"), cfg) == plan


def test_two_roots_planned_from_the_same_list_write_the_same_plan(tmp_path):
    plans = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        root = DatasetRoot(tmp_path / name)
        _tsv(root / "urls.tsv", ROWS)
        assert make_plan(root, DownloadConfig(urls="urls.tsv", samples_per_shard=2)).inputs[0].path == "urls.tsv"
        plans.append((root / "_state/download/plan.json").read_bytes())
    assert plans[0] == plans[1]


def test_a_changed_list_after_finished_shards_stops(tmp_path):
    root = DatasetRoot(tmp_path)
    _tsv(root / "urls.tsv", ROWS)
    cfg = DownloadConfig(urls="urls.tsv", samples_per_shard=2)
    make_plan(root, cfg)
    (root / "_state/download/00000.done.json").write_text("{}")
    _tsv(root / "urls.tsv", ROWS[:2])
    with pytest.raises(UrlListError, match="changed since"):
        make_plan(root, cfg)


def test_missing_list_and_empty_folder(tmp_path):
    root = DatasetRoot(tmp_path)
    with pytest.raises(UrlListError, match="url list not found"):
        make_plan(root, DownloadConfig(urls="nope.tsv"))
    (root / "urls").mkdir()
    with pytest.raises(UrlListError, match="no url list"):
        make_plan(root, DownloadConfig(urls="urls"))
