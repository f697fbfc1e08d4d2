"""The one decoder for untrusted image bytes.

Everything a user sends goes through `decode_image`: the format is sniffed from the content (never
from a file name or URL), limits on bytes and on pixels are checked *before* any pixel is decoded
(so a decompression bomb is refused, not decoded), EXIF orientation is applied, and every mode
Pillow can produce is turned into plain 8-bit RGB.  Anything else is an `InvalidImage` with a
message fit to show the person who sent it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.errors import InvalidImage

#: Formats we accept, as Pillow's openers name them.  The JPEG opener also reads MPO, what many
#: phone cameras write (a JPEG with extra frames); only the first frame of any file is used.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

#: Transparent pixels are shown on white, as a chat client shows them.
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000

    @classmethod
    def from_settings(cls, settings) -> ImageLimits:  # settings: config.Settings
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


def decode_image(
    data: bytes,
    limits: ImageLimits = ImageLimits(),
    *,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode untrusted bytes into an RGB image, or raise `InvalidImage`.

    `draft_size` is the smallest (width, height) the caller needs.  For JPEG, Pillow's draft mode
    then decodes at 1/2, 1/4 or 1/8 scale while staying at least that large: for a 12-megapixel
    phone photo feeding a 224-pixel classifier that is several times faster than a full decode.
    """
    if not data:
        raise InvalidImage("That file is empty.")
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            f"That file is too large ({_megabytes(len(data))}); the limit is {_megabytes(limits.max_bytes)}."
        )
    Image.init()  # registers every plugin; `Image.open(formats=...)` only pre-registers a few
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(f"That file is not an image I can read (send a {_FORMAT_NAMES}).") from None
    except Image.DecompressionBombError:
        raise InvalidImage("That image has too many pixels to decode safely.") from None
    except Exception:  # a plugin choking on a malformed header
        raise InvalidImage("That image is corrupt: its header cannot be read.") from None

    # Only the header has been read so far: check the size before decoding a single pixel.
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage("That image has no pixels.")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"That image is too large ({width}×{height} = {width * height / 1e6:.0f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:.0f} megapixels."
        )

    try:
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, _draft_request(draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except InvalidImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow says "image file is truncated", "broken data stream", "unrecognized data
        # stream contents"…: all mean the bytes end or break before the image does.
        raise InvalidImage("That image is truncated or corrupt and cannot be decoded.") from error
    except Exception as error:
        raise InvalidImage("That image cannot be decoded.") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_bit_depth_to_rgb(image)
    if image.mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale: Pillow's convert() clips at 255, which turns them white."""
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
    if image.mode == "I" and top <= 255.0:
        top = 255.0
    if image.mode == "I" and 255.0 < top <= 65535.0:
        top = 65535.0  # 16-bit PNGs open as mode "I"
    gray = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _draft_request(draft_size: tuple[int, int]) -> tuple[int, int]:
    # Requested square, so that it holds whatever the EXIF orientation turns out to be.
    side = max(draft_size)
    return (side, side)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"
