"""The checks an image from outside passes before anything decodes its pixels: one that was
downloaded (``pipeline/image_check.py``) and a user's own file (``make sample IMAGE=``) alike.

Pillow reads only the header on opening, so an image's size is known before its pixels are: a
380 KB PNG that claims 20000x20000 pixels is refused here, where a decoder would take gigabytes.
Its failures (no image at all, truncated data, a bomb) come back as ``ImageRejected`` with the
reasons that ``core/failures.py`` counts. A user's file is also read no further than the download
stage reads a body (``download.max_image_bytes``): ``/dev/zero`` or a 40 GB file ends after that
many bytes, not when memory does.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

# Pillow warns above its own pixel limit from any thread; our limit is checked explicitly below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(ValueError):
    """The bytes are not an image this project will use; the message is the failure reason."""


def too_many_bytes(limit: int) -> ImageRejected:
    """The one wording of the byte limit, downloaded or read from a file (``failures.py`` counts it)."""
    return ImageRejected(f"file too large: more than {limit} bytes")


def pil_open(stream: BinaryIO) -> Image.Image:
    """Pillow's own ``Image.open``: importing ultralytics replaces it with a wrapper that, on an
    unidentified image, pip-installs pi-heif at run time instead of raising."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(stream)


@contextmanager
def opened_image(stream: BinaryIO, max_pixels: int) -> Iterator[Image.Image]:
    """Pillow's image of ``stream``, refused before any pixel is decoded if it has more than
    ``max_pixels``; what Pillow raises inside the block (decoding it) comes out as ``ImageRejected``."""
    try:
        with pil_open(stream) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(f"decompression bomb: {width}x{height} pixels > limit {max_pixels}")
            yield image
    except UnidentifiedImageError:
        raise ImageRejected("not an image: cannot identify image file") from None
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"decompression bomb: {err}") from None
    except OSError as err:
        raise ImageRejected(f"broken image: {err}") from None


def read_image_file(path: Path, max_bytes: int, max_pixels: int) -> bytes:
    """A user's image file, checked as a downloaded image is: a regular file of at most
    ``max_bytes`` (read no further), an image of at most ``max_pixels`` that decodes whole.

    Raises ``ImageRejected`` with the reason, or ``OSError`` for a file that cannot be read.
    """
    if not path.is_file():  # a device (/dev/zero), a pipe or a folder: no size to trust
        raise ImageRejected("not a regular file" if path.exists() else "no such file")
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_many_bytes(max_bytes)
    if not data:
        raise ImageRejected("not an image: the file is empty")
    with opened_image(io.BytesIO(data), max_pixels) as image:
        image.load()  # raises on truncated or corrupt data
    return data
