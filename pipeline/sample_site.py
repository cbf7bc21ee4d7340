"""The embedded default sample: real photographs that ship with installed packages, served over HTTP.

The demo has no internet, yet must run the real download path. So the photos bundled with
scikit-image, matplotlib and ultralytics (plus any folder the user names) are copied into
``<root>/_sample_site/``, a CC12M-style url list (tab-separated, no header line, like the real
cc12m.tsv) is written to ``<root>/urls/sample.tsv``, and a small HTTP server on 127.0.0.1 serves
the site while the download stage runs. A few planted bad urls show the failure accounting.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from four_m.core.config import SampleConfig
from four_m.core.dataset_root import DatasetRoot, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.storage import RootPath, scratch

SITE = "_sample_site"
URL_LIST = "urls/sample.tsv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# (package, path inside it, alt-text caption in CC12M's style)
BUNDLED_PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("skimage", "data/astronaut.png", "astronaut eileen collins in an orange flight suit with the us flag"),
    ("skimage", "data/chelsea.png", "a tabby cat named chelsea looking to the side"),
    ("skimage", "data/coffee.png", "a cup of coffee on a saucer with a spoon, seen from above"),
    ("skimage", "data/rocket.jpg", "a rocket on the launch pad before lift off"),
    ("skimage", "data/motorcycle_left.png", "a red and white motorcycle in a studio, left view"),
    ("skimage", "data/motorcycle_right.png", "a red and white motorcycle in a studio, right view"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble deep field: hundreds of distant galaxies"),
    (
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "portrait of rear admiral grace hopper in uniform",
    ),
    ("ultralytics", "assets/bus.jpg", "people walking past a blue city bus on a street"),
    ("ultralytics", "assets/zidane.jpg", "two football coaches in suits talking at a press event"),
)


def bundled_photo_paths() -> list[tuple[Path, str]]:
    """The bundled photos that exist in this environment, with their captions."""
    found = []
    for package, relative, caption in BUNDLED_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        path = Path(spec.origin).parent / relative
        if path.is_file():
            found.append((path, caption))
    return found


def build_sample(root: DatasetRoot, cfg: SampleConfig) -> RootPath:
    """Write the site and its url list under ``root``; the same inputs always give the same list.

    The site's files stay on this machine when the root is remote: a local server serves them."""
    site = scratch(root / SITE)
    site.mkdir(parents=True, exist_ok=True)
    photos = bundled_photo_paths()
    if cfg.extra_images:
        extra = sorted(p for p in Path(cfg.extra_images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        photos += [(p, p.stem.replace("_", " ")) for p in extra]
    photos = photos[: cfg.photos]
    if not photos:
        raise FileNotFoundError("no sample photos found: install scikit-image, matplotlib or ultralytics")
    base = f"http://{cfg.host}:{cfg.port}"
    lines = []
    for number, (path, caption) in enumerate(photos):
        name = f"{number:03d}_{path.name}"
        shutil.copyfile(path, site / name)
        lines.append(f"{base}/{name}\t{caption}")
    if cfg.plant_duplicates:
        # Among the photos, before the last two: the last shard, which training holds out, keeps
        # two photos to evaluate on (copies removed by curation would leave it nothing).
        lines[-2:-2] = _plant_duplicates(site, photos, base)
    if cfg.plant_failures:
        lines += _plant_failures(site, photos[0][0], base)
    url_list = root / URL_LIST
    write_text_atomic(url_list, "\n".join(lines) + "\n")
    return url_list


DUPLICATES: tuple[tuple[str, str], ...] = (
    ("exact", "the same file"),
    ("reencoded", "re-encoded as JPEG at quality 60"),
    ("resized", "resized to 70 %"),
    ("cropped", "cropped by 3 % on every side"),
)
"""The planted copies, one per photo from the first on: what curation's duplicate filters must find."""


def _plant_duplicates(site: Path, photos: list[tuple[Path, str]], base: str) -> list[str]:
    """Copies of the first photos at other urls, each changed as :data:`DUPLICATES` says, with the
    original's caption: the same bytes always (PIL's encoders are deterministic)."""
    from PIL import Image

    lines = []
    for (how, what), (path, caption) in zip(DUPLICATES, photos, strict=False):
        name = f"copy_{how}_{path.stem}.jpg" if how != "exact" else f"copy_{how}_{path.name}"
        if how == "exact":
            shutil.copyfile(path, site / name)
        else:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            width, height = image.size
            if how == "resized":
                image = image.resize((width * 7 // 10, height * 7 // 10), Image.Resampling.LANCZOS)
            elif how == "cropped":
                dx, dy = width * 3 // 100, height * 3 // 100
                image = image.crop((dx, dy, width - dx, height - dy))
            image.save(site / name, "JPEG", quality=60 if how == "reencoded" else 90)
        lines.append(f"{base}/{name}\t{caption} (planted duplicate: {what})")
    return lines


def _plant_failures(site: Path, photo: Path, base: str) -> list[str]:
    """One row per failure reason the demo should show: each must end counted, not lost."""
    (site / "not_an_image.jpg").write_text("<html><body>this page moved</body></html>")
    data = photo.read_bytes()
    (site / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return [
        f"{base}/missing.jpg\tplanted failure: this file does not exist (404)",
        f"{base}/not_an_image.jpg\tplanted failure: an html page served as a jpg",
        f"{base}/truncated.jpg\tplanted failure: the first half of an image",
        "file:///etc/hostname\tplanted failure: a local file url, which must never be read",
    ]


class SampleServerError(UserError):
    """The sample cannot be served (the port is taken, say)."""


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without a log line per request."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


class _QuietServer(ThreadingHTTPServer):
    """A client that gives up (a download timeout) is routine here, not a traceback on stderr."""

    daemon_threads = True
    # The listen backlog. socketserver's default of 5 drops the connections of a downloader's many
    # threads arriving at once; each dropped one waits out TCP's 1 s, 3 s, 7 s retransmits, and some
    # time out. bench/download.py's 64 clients: about 100 images/s with 5, 750-1100 with 128.
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serve_directory(
    directory: Path, host: str, port: int, handler: type[SimpleHTTPRequestHandler] = QuietHandler
) -> Iterator[str]:
    """Serve ``directory`` on host:port (0 picks a free port) in a thread; yields the base url."""
    try:
        server = _QuietServer((host, port), partial(handler, directory=str(directory)))
    except OSError as err:
        raise SampleServerError(
            f"cannot serve the sample on {host}:{port} ({err}); set sample.port to a free port"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="sample-site", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serving_if_enabled(cfg: SampleConfig, root: DatasetRoot):
    """For the embedded sample: (re)build it, identical each time, and serve it; otherwise do nothing."""
    if not cfg.enabled:
        return nullcontext()
    build_sample(root, cfg)
    return serve_directory(scratch(root / SITE), cfg.host, cfg.port)
