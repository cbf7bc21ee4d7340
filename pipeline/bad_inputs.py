"""A corpus of bad inputs run through the whole pipeline (``make bad-input`` and its test).

Web image lists go wrong in known ways: dead links, slow hosts, HTML where an image should be,
truncated or exotic files (CMYK, 16-bit, EXIF-rotated, animated, 1x1, a decompression bomb), urls
no fetcher may follow, captions that are not UTF-8. Each case here is a file on a small local
site (or a url no server answers) plus one url-list row, and says what must become of it: either
*processed*, coming out as a known picture (an EXIF-rotated photo upright, a CMYK one in its own
colours), or *counted* under a named failure reason, its row kept by every later stage. Real
photographs (the embedded sample's) ride along: every one must come out with an image, labels and
tokens. ``audit`` checks all of that on a finished root and counts what it finds.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, atomic_path
from four_m.core.failures import SUCCESS, failure_reason
from four_m.core.modalities import MODALITIES
from four_m.pipeline.download import run_download
from four_m.pipeline.label import run_label
from four_m.pipeline.sample_site import QuietHandler, bundled_photo_paths, serve_directory
from four_m.pipeline.tokenize import run_tokenize
from four_m.pipeline.tokenizers import run_tokenizer_training

SUBROOT = "_bad_input"
"""``make bad-input`` runs in ``<root>/_bad_input/``: a dataset root of its own."""
SITE = "_site"
URL_LIST = "urls/bad_inputs.tsv"
SLOW = "/slow"
"""Paths under it are answered only after the download timeout."""
MAX_MEAN_ERROR = 12.0
"""Mean absolute difference (0-255) allowed between a stored image and the picture it must show:
JPEG at quality 95 and a different resampler stay well below; a sideways, inverted or saturated
image, or another frame, are far above."""


@dataclass(frozen=True)
class Case:
    name: str
    url: str
    """A path on the corpus site (``/x.jpg``), or a whole url."""
    reason: str | None
    """The failure reason it must be counted under; None: it must come out processed."""
    body: bytes | None = None
    """What the site serves at ``url`` (None: nothing, e.g. a 404)."""
    expected: Callable[[], Image.Image] | None = None
    """The upright RGB picture its stored image must show, when it is processed."""
    caption: bytes = b""
    """The url list's caption, as raw bytes (it must come out decoded, bad bytes replaced)."""
    good: bool = False
    """One of the real photos riding along, not a bad input."""


def corpus_cases() -> tuple[Case, ...]:
    """The cases, built from the embedded sample's real photos (at least four)."""
    photos = [path for path, _ in bundled_photo_paths()]
    if len(photos) < 4:
        raise FileNotFoundError("the bad-input corpus needs four sample photos: install scikit-image and matplotlib")
    # Two landscape photos: an EXIF rotation must show in the stored shape, not only in its pixels.
    first, second = [image for image in map(_rgb, photos) if image.width > image.height][:2]
    jpeg = _encode(first, "JPEG", quality=95)
    rotated = _encode(first, "JPEG", exif=_orientation(6))  # shown turned 90° clockwise
    grey16 = np.asarray(first.convert("L"), np.uint16) * 257
    alpha = first.copy()
    alpha.putalpha(128)
    cases = [
        Case("http_404", "/missing.jpg", "http_404"),
        Case("timeout", f"{SLOW}/slow.jpg", "timeout", jpeg, lambda: first),  # what it shows if served in time
        Case("connection_refused", "http://127.0.0.1:1/refused.jpg", "connection_error"),
        Case("html_body", "/page.jpg", "not_an_image", body=b"<html><body>this page moved</body></html>"),
        Case("empty_body", "/empty.jpg", "not_an_image", body=b""),
        Case("truncated_jpeg", "/truncated.jpg", "truncated_image", body=jpeg[: len(jpeg) // 2]),
        Case("decompression_bomb", "/bomb.png", "decompression_bomb", body=_png_header_bomb(30_000, 30_000)),
        Case("long_banner", "/banner.png", "aspect_ratio", body=_encode(first.resize((4000, 2)), "PNG")),
        Case("file_url", "file:///etc/hostname", "unsupported_scheme"),
        Case("no_host_url", "http:///no_host.jpg", "invalid_url"),
        Case("empty_url", "", "empty_url"),
        Case("cmyk_jpeg", "/cmyk.jpg", None, _encode(first.convert("CMYK"), "JPEG", quality=95), lambda: first),
        Case("png_16bit_rgb", "/rgb16.png", None, _png16_rgb(first), lambda: first),
        Case("png_16bit_grey", "/grey16.png", None, _encode(Image.fromarray(grey16), "PNG"), lambda: _grey(first)),
        Case("grey_jpeg", "/grey.jpg", None, _encode(first.convert("L"), "JPEG", quality=95), lambda: _grey(first)),
        Case("transparent_png", "/alpha.png", None, _encode(alpha, "PNG"), lambda: _on_white(alpha)),
        Case("one_pixel", "/pixel.png", None, _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), _pixel),
        Case("exif_rotated", "/rotated.jpg", None, rotated, lambda: first.transpose(Image.Transpose.ROTATE_270)),
        Case("animated_gif", "/animated.gif", None, _gif(first, second), lambda: first),
        Case("non_ascii_path", "/café_crème.jpg", None, jpeg, lambda: first),
        Case("non_utf8_caption", "/latin1.jpg", None, jpeg, lambda: first, caption=b"caf\xe9 cr\xe8me br\xfbl\xe9e"),
    ]
    for number, path in enumerate(photos[:4]):
        picture = _rgb(path)
        body = path.read_bytes()
        cases.append(Case(path.stem, f"/good_{number}{path.suffix}", None, body, lambda p=picture: p, good=True))
    return tuple(dataclasses.replace(c, caption=c.caption or f"bad input: {c.name}".encode()) for c in cases)


def write_corpus(root: DatasetRoot, base_url: str, cases: tuple[Case, ...]) -> storage.RootPath:
    """Write the site's files under ``root`` and the url list (raw bytes: one caption is not
    UTF-8); the same cases and base url give the same list, so a rerun reuses the download plan."""
    site = storage.scratch(root / SITE)  # served from this machine, wherever the root is
    site.mkdir(parents=True, exist_ok=True)
    lines = []
    for case in cases:
        if case.body is not None:
            (site / case.url.removeprefix(SLOW).lstrip("/")).write_bytes(case.body)
        lines.append(listed_url(case, base_url).encode() + b"\t" + case.caption + b"\n")
    url_list = root / URL_LIST
    with atomic_path(url_list) as temp:
        temp.write_bytes(b"".join(lines))
    return url_list


def listed_url(case: Case, base_url: str) -> str:
    return f"{base_url}{case.url}" if case.url.startswith("/") else case.url


class CorpusHandler(QuietHandler):
    """Serves the corpus site; a path under ``/slow`` answers only after ``delay_s``."""

    delay_s: float = 0.0

    def do_GET(self):
        if self.path.startswith(f"{SLOW}/"):
            time.sleep(self.delay_s)
            self.path = self.path.removeprefix(SLOW)
        super().do_GET()


@contextmanager
def serve_corpus(root: DatasetRoot, host: str, port: int, delay_s: float) -> Iterator[str]:
    """Serve the corpus site of ``root`` (port 0: a free one); yields the base url."""
    handler = type("DelayedCorpusHandler", (CorpusHandler,), {"delay_s": delay_s})
    with serve_directory(storage.scratch(root / SITE), host, port, handler) as base_url:
        yield base_url


@dataclass
class Audit:
    """What became of each case: the figures the suite and ``make bad-input`` print."""

    tried: int = 0
    processed: int = 0
    counted: Counter = field(default_factory=Counter)
    """Cases counted under their expected reason, by reason."""
    good: int = 0
    good_kept: int = 0
    """Good photos with an image, every label and every token row."""
    lost: int = 0
    """Rows missing from (or repeated in) any stage's output."""
    problems: list[str] = field(default_factory=list)
    """One line per case that did not end as it must."""

    def line(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counted.items()))
        return (
            f"bad-input: cases tried {self.tried}, processed {self.processed},"
            f" counted failures {sum(self.counted.values())} ({reasons}); good samples kept"
            f" {self.good_kept}/{self.good}; samples lost {self.lost}; problems {len(self.problems)}"
        )


def audit(root: DatasetRoot, cases: tuple[Case, ...], base_url: str, config: Config) -> Audit:
    """Check every case on a root that went through download, label and tokenize."""
    images, repeated = _by_key(root, "images")
    by_url = Counter(row["url"] for row in images.values())
    rows = {row["url"]: (key, row) for key, row in images.items()}
    downstream = {}
    for folder in sorted(f"{k}/{p.name}" for k in ("labels", "tokens") for p in (root / k).glob("*") if p.is_dir()):
        downstream[folder], twice = _by_key(root, folder)
        repeated |= twice
    # Tokens that need the image; captions from the url list's alt-text outlive a failed download.
    image_derived = {
        f"tokens/{m}"
        for m, spec in MODALITIES.items()
        if not (spec.alt_text and config.tokenize.caption_source == "alt_text")
    }
    result = Audit()
    for case in cases:
        result.tried += 1
        result.good += case.good
        url = listed_url(case, base_url)
        key = rows[url][0] if url in rows else None
        if by_url[url] != 1 or key in repeated or any(key not in found for found in downstream.values()):
            result.lost += 1
            result.problems.append(f"{case.name}: {by_url[url]} rows in images/, repeated or missing downstream")
            continue
        row = rows[url][1]
        problems = _check(case, row, {f: found[key] for f, found in downstream.items()}, image_derived)
        if problems:
            result.problems += [f"{case.name}: {p}" for p in problems]
        elif case.reason is not None:
            result.counted[case.reason] += 1
        else:
            result.processed += 1
            result.good_kept += case.good
    return result


def _check(case: Case, row: dict, downstream: dict[str, dict], image_derived: set[str]) -> list[str]:
    """What is wrong with one case's rows (empty if nothing)."""
    problems = []
    caption = case.caption.decode("utf-8", errors="replace")
    if row["caption"] != caption:
        problems.append(f"caption {row['caption']!r}, expected {caption!r}")
    if case.reason is not None:
        got = failure_reason(row["error_message"]) if row["status"] != SUCCESS else "success"
        if got != case.reason:
            problems.append(f"download: {got} ({row['error_message']}), expected {case.reason}")
        for folder, found in downstream.items():
            if (folder.startswith("labels/") or folder in image_derived) and found.get("error") is None:
                problems.append(f"{folder}: has a value for a failed download")
        return problems
    if row["status"] != SUCCESS:
        return [*problems, f"download failed: {row['error_message']}"]
    problems += _image_problems(Image.open(io.BytesIO(row["jpg"])).convert("RGB"), case.expected())
    for folder, found in downstream.items():
        if found.get("error") is not None:
            problems.append(f"{folder}: {found['error']}")
    return problems


def _image_problems(stored: Image.Image, expected: Image.Image) -> list[str]:
    width, height = stored.size
    ex_width, ex_height = expected.size
    if abs(width * ex_height - height * ex_width) > max(ex_width, ex_height):  # one pixel of rounding
        return [f"stored {width}x{height}, not the shape of the expected {ex_width}x{ex_height}"]
    reference = np.asarray(expected.resize(stored.size, Image.Resampling.BOX), np.float32)
    error = float(np.abs(np.asarray(stored, np.float32) - reference).mean())
    return [f"stored image differs from the expected one by {error:.1f} on average"] if error > MAX_MEAN_ERROR else []


def _by_key(root: DatasetRoot, folder: str) -> tuple[dict[str, dict], set[str]]:
    """Every row of a folder's shards by key, and the keys seen more than once."""
    found: dict[str, dict] = {}
    repeated = set()
    for path in sorted((root / folder).glob("[0-9]*.parquet")):
        columns = None if folder == "images" else ["key", "error"]
        for row in storage.read_table(path, columns=columns).to_pylist():
            if row["key"] in found:
                repeated.add(row["key"])
            found[row["key"]] = row
    return found, repeated


def corpus_config(config: Config) -> Config:
    """The config of ``make bad-input``: its own root under the configured one, its own url list."""
    return dataclasses.replace(
        config,
        root=str(DatasetRoot(config.root) / SUBROOT),
        sample=dataclasses.replace(config.sample, enabled=False),
        download=dataclasses.replace(config.download, urls=URL_LIST),
    )


@dataclass(frozen=True)
class CorpusRun:
    lines: list[str]
    """Each stage's summary lines."""
    audit: Audit
    base_url: str
    """Where the corpus site was served (the url list names it)."""


def run_bad_input(config: Config, progress: bool = True, port: int | None = None) -> CorpusRun:
    """Write the corpus, run download, label, tokenizers and tokenize on it, and audit the result.

    The site is served on ``sample.port`` (fixed, so a rerun reuses the plan; ``port=0`` picks a
    free one). Tokenizers already trained under the configured root are copied (same settings,
    same ids), so after ``make demo`` this takes about a minute; otherwise they are trained here.
    """
    corpus = corpus_config(config)
    root = DatasetRoot(corpus.root)
    cases = corpus_cases()
    port = config.sample.port if port is None else port
    with serve_corpus(root, config.sample.host, port, delay_s=corpus.download.timeout_s + 1) as base_url:
        write_corpus(root, base_url, cases)
        lines = [run_download(corpus, progress=progress).line()]
    lines += run_label(corpus, progress=progress).lines()
    trained = DatasetRoot(config.root) / "tokenizers"
    if trained.is_dir() and not (root / "tokenizers").exists():
        storage.copy_tree(trained, root / "tokenizers")
    lines += run_tokenizer_training(corpus).lines()
    lines += run_tokenize(corpus, progress=progress).lines()
    return CorpusRun(lines, audit(root, cases, base_url, corpus), base_url)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _grey(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def _on_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def _pixel() -> Image.Image:
    return Image.new("RGB", (1, 1), (10, 200, 30))


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _gif(first: Image.Image, second: Image.Image) -> bytes:
    """Two frames: the pipeline must keep the first."""
    out = io.BytesIO()
    first.save(out, format="GIF", save_all=True, append_images=[second.resize(first.size)], duration=100, loop=0)
    return out.getvalue()


def _png16_rgb(image: Image.Image) -> bytes:
    """A 48-bit PNG (Pillow writes none): the photo's 8-bit values scaled to the 16-bit range."""
    bgr = np.asarray(image, np.uint16)[..., ::-1] * 257
    return cv2.imencode(".png", bgr)[1].tobytes()


def _png_header_bomb(width: int, height: int) -> bytes:
    """A grey PNG that declares ``width`` x ``height`` pixels but carries only its first rows: all a
    decoder needs to be tempted into allocating the whole image."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(4)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
