import urllib.request

from four_m.core.config import SampleConfig
from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline.sample_site import SITE, build_sample, serve_directory


def test_sample_list_is_cc12m_style_and_deterministic(tmp_path, photos):
    root = DatasetRoot(tmp_path)
    cfg = SampleConfig(enabled=True, port=40001)
    url_list = build_sample(root, cfg)
    first = url_list.read_bytes()
    lines = first.decode().splitlines()
    assert len(lines) == len(photos) + 4  # four planted failures
    assert all(len(line.split("\t")) == 2 for line in lines)
    assert not lines[0].startswith("url\t"), "CC12M's tsv has no header line"
    assert lines[0].startswith("http://127.0.0.1:40001/")
    assert build_sample(root, cfg).read_bytes() == first


def test_extra_images_folder_is_added(tmp_path, photos):
    extra = tmp_path / "mine"
    extra.mkdir()
    (extra / "my_dog.jpg").write_bytes(photos[0][0].read_bytes())
    root = DatasetRoot(tmp_path / "root")
    lines = build_sample(root, SampleConfig(extra_images=str(extra), plant_failures=False)).read_text().splitlines()
    assert lines[-1].endswith("_my_dog.jpg\tmy dog")
    assert len(lines) == len(photos) + 1


def test_photos_keeps_the_first_ones_and_the_planted_failures(tmp_path, photos):
    everything = build_sample(DatasetRoot(tmp_path / "all"), SampleConfig()).read_text().splitlines()
    two = build_sample(DatasetRoot(tmp_path / "two"), SampleConfig(photos=2)).read_text().splitlines()
    failures = len(everything) - len(photos)
    assert len(photos) > 2 and two == everything[:2] + everything[-failures:]


def test_server_serves_the_site_bytes(tmp_path, photos):
    root = DatasetRoot(tmp_path)
    build_sample(root, SampleConfig(plant_failures=False))
    name = sorted((root / SITE).iterdir())[0].name
    with serve_directory(root / SITE, "127.0.0.1", 0) as base:
        body = urllib.request.urlopen(f"{base}/{name}", timeout=5).read()
    assert body == (root / SITE / name).read_bytes()
