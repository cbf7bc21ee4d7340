"""A strict decode check in front of img2dataset's resizer.

img2dataset decodes with ``cv2.imdecode(IMREAD_UNCHANGED)``, which (a) returns a grey-filled image
for a truncated JPEG instead of failing, (b) ignores the EXIF orientation, so rotated phone photos
end up sideways, (c) has no decompression-bomb limit and (d) cannot re-encode 16-bit or CMYK data
as JPEG: a 16-bit RGB PNG comes out with every channel saturated. Pillow sees all four. The
common case (an 8-bit RGB or grey JPEG/PNG/WebP, upright) is only checked, in draft mode, which
decodes a JPEG at 1/8 scale and costs about a millisecond; the rest is normalised to an upright
8-bit RGB(A) PNG before img2dataset's resizer sees it. Last, an image so long and thin that
resizing its shorter side would make one no encoder (or memory) holds is refused, not attempted:
img2dataset scales a 4000x2 banner to 128000x64 at 64 px, then fails with a cryptic message.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from img2dataset.resizer import ResizeMode, Resizer
from PIL import Image, ImageOps

from four_m.core.images import ImageRejected, opened_image

ORIENTATION_TAG = 0x0112
PASS_THROUGH_MODES = {"RGB", "L", "RGBA"}
PASS_THROUGH_FORMATS = {"JPEG", "PNG", "WEBP"}  # what cv2.imdecode reads in every opencv build
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENCODER_MAX_SIDE = {"jpg": 65_535, "webp": 16_383, "png": 2**31 - 1}
"""The longest side each output format can store."""


def checked_image_stream(stream: BinaryIO, max_pixels: int) -> tuple[BinaryIO, tuple[int, int]]:
    """``stream`` itself if cv2 can take it as is, else an upright 8-bit PNG of the image; and the
    upright image's (width, height)."""
    stream.seek(0)
    # Pillow reads a 16-bit PNG into an 8-bit mode; only the header says what cv2 would get.
    header = stream.read(25)
    sixteen_bit_png = header[:8] == PNG_SIGNATURE and len(header) == 25 and header[24] == 16
    stream.seek(0)
    with opened_image(stream, max_pixels) as image:
        width, height = image.size
        upright = image.getexif().get(ORIENTATION_TAG, 1) == 1
        simple = (
            upright
            and image.mode in PASS_THROUGH_MODES
            and image.format in PASS_THROUGH_FORMATS
            and not sixteen_bit_png
            and not getattr(image, "is_animated", False)
        )
        if simple:
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()  # raises on truncated data, at a fraction of a full decode
            stream.seek(0)
            return stream, (width, height)
        image.load()
        upright_image = ImageOps.exif_transpose(image)
        return _as_png(upright_image), upright_image.size


def _as_png(image: Image.Image) -> BinaryIO:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: keep the top 8 bits of the 16-bit range, as viewers show it.
        image = image.point(lambda v: v / 256).convert("L")
    elif image.mode not in PASS_THROUGH_MODES:
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    out.seek(0)
    return out


class CheckedResizer(Resizer):
    """img2dataset's Resizer, fed only images that passed ``checked_image_stream`` and whose resized
    size fits the output format and ``max_pixels``."""

    def __init__(self, *, max_pixels: int, **resizer_args):
        super().__init__(**resizer_args)
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            stream, (width, height) = checked_image_stream(img_stream, self.max_pixels)
            self._check_resized(width, height)
        except ImageRejected as err:
            return None, None, None, None, None, str(err)
        return super().__call__(stream, blurring_bbox_list)

    def _check_resized(self, width: int, height: int) -> None:
        """Refuse an image whose resize (img2dataset's arithmetic) makes more than ``max_pixels``
        pixels, or a stored side longer than the output format holds."""
        if self.resize_mode in (ResizeMode.keep_ratio_largest, ResizeMode.border):
            return  # the longer side comes down to image_size (or already is below it)
        short, long = sorted((width, height))
        scaled = self.resize_mode != ResizeMode.no and not (self.resize_only_if_bigger and short <= self.image_size)
        if scaled:
            short, long = self.image_size, int(long * self.image_size / short)
        stored_long = self.image_size if scaled and self.resize_mode == ResizeMode.center_crop else long
        limit = ENCODER_MAX_SIDE[self.encode_format]
        if short * long > self.max_pixels or stored_long > limit:
            raise ImageRejected(
                f"aspect ratio too large: {width}x{height} resizes to {short} by {long} px, over"
                f" {self.max_pixels} pixels or the {limit} px a {self.encode_format} side holds"
            )
