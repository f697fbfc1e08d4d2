"""The one decoder for untrusted image bytes.

Everything a user sends goes through `decode_image`: the format is sniffed from the content (never
from a file name or URL), limits on bytes and on pixels are checked *before* any pixel is decoded
(so a decompression bomb is refused, not decoded), EXIF orientation is applied, and every mode
Pillow can produce is turned into plain 8-bit RGB.  Anything else is an `InvalidImage` with a
message fit to show the person who sent it.

`decode_image` is two steps, which a worker takes apart (`inference.worker.decoding`):
`open_image` reads and checks the header and estimates what decoding will hold in memory
(`decode_cost`, refused past `ImageLimits.max_decode_bytes`); `OpenedImage.decode` decodes.

A header is checked against more than its pixel count: what a decoder will spend is bounded by
the image, not by what its structures declare.  The long side may be at most `max_aspect_ratio`
times the short side; a JPEG may have at most `max_jpeg_scans` scans (libjpeg walks every block
of the image once per scan); a TIFF's tiles may not be much larger than the image (libtiff
allocates a whole tile before reading it) nor its strips and tiles point past the end of the
file.  Only the first frame of an animation is ever decoded.

The preprocessing helpers at the end (`scale_to_fit`, `resize_center_crop`) are plain Pillow, so
that every runtime (torch, ONNX Runtime, none) gets the same bounded work for thin images.
"""

from __future__ import annotations

import io
import math

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from config import Settings
from inference.decode_cost import CONVERSION_ROWS, decode_cost, header_orientation
from inference.errors import InvalidImage
from inference.image_checks import check_jpeg_scans, check_tiff_layout


#: Formats we accept, as Pillow's openers name them.  The JPEG opener also reads MPO, what many
#: phone cameras write (a JPEG with extra frames); only the first frame of any file is used.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

#: Transparent pixels are shown on white, as a chat client shows them.
_BACKGROUND = (255, 255, 255)



@dataclass(frozen=True)
class ImageLimits:
    """What one decode may cost; `config.Settings` names each one (see the README), and its
    defaults are the settings' defaults, written there once."""

    max_bytes: int = Settings.max_image_bytes
    max_pixels: int = Settings.max_image_pixels
    #: The long side may be at most this many times the short side.
    max_aspect_ratio: float = Settings.max_image_aspect_ratio
    #: Start-of-scan markers a JPEG may have.  Real encoders write 1 (baseline), about 10
    #: (libjpeg's progressive script) or a few dozen at most (mozjpeg, Photoshop).
    max_jpeg_scans: int = Settings.max_jpeg_scans
    #: What decoding one image may hold in memory at its peak (`decode_cost`); 0: no limit.
    #: A worker also decodes a batch's images side by side only while they fit in it together.
    max_decode_bytes: int = Settings.decode_memory_mb * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_image_aspect_ratio,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_decode_bytes=settings.decode_memory_mb * 1024 * 1024,
        )


@dataclass(frozen=True)
class OpenedImage:
    """An image whose header passed every check and whose pixels are not decoded yet."""

    image: Image.Image
    #: What `decode` will hold in memory at its peak (`decode_cost`).
    decode_bytes: int
    #: The header's EXIF orientation asks for a turn or a flip (counted in `decode_bytes`).
    transpose: bool

    def decode(self) -> Image.Image:
        """The pixels, turned upright and in 8-bit RGB, or `InvalidImage`."""
        with _decode_errors():
            image = self.image
            image.load()
            if self.transpose:
                # In place: the upright copy replaces the decoded pixels instead of joining them.
                ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image)
            # An RGB image comes back as the opened file itself: hand out a plain image over the
            # same pixels, so that the opener's state (a WebP decoder's canvas) can go.
            return rgb._new(rgb.im) if rgb is image else rgb


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
    return open_image(data, limits, draft_size=draft_size).decode()


def open_image(
    data: bytes,
    limits: ImageLimits = ImageLimits(),
    *,
    draft_size: tuple[int, int] | None = None,
) -> OpenedImage:
    """Read and check the header of untrusted bytes (no pixel is decoded), or raise `InvalidImage`.

    `draft_size` as for `decode_image`: the draft only sets the JPEG decoder's scale.
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
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise InvalidImage(
            f"That image is {width}×{height} pixels: too thin to use "
            f"(its long side may be at most {limits.max_aspect_ratio:g} times its short side)."
        )
    jpeg_scans = None
    if image.format in ("JPEG", "MPO"):
        jpeg_scans = check_jpeg_scans(data, limits.max_jpeg_scans)
    elif image.format == "TIFF":
        check_tiff_layout(image, len(data))

    # Pillow's openers stop at the first frame of an animation (GIF, WebP, APNG, multi-page
    # TIFF, MPO) and nothing here seeks further: later frames are never decoded.
    with _decode_errors():
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            image.draft(None, _draft_request(draft_size))
        transpose = header_orientation(image) != 1
        cost = decode_cost(image, jpeg_scans=jpeg_scans)
    if 0 < limits.max_decode_bytes < cost:
        raise InvalidImage(
            f"That image would take about {_round_megabytes(cost)} of memory to decode; this bot decodes "
            f"at most {_round_megabytes(limits.max_decode_bytes)} at a time (a JPEG, or a smaller image, will do)."
        )
    return OpenedImage(image, cost, transpose)


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Whatever Pillow raises while decoding → `InvalidImage` with a line for the sender."""
    try:
        yield
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
    if image.mode in ("PA", "RGBa", "La"):  # a palette, or colours multiplied by their alpha
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        return _on_white(image)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _on_white(image: Image.Image) -> Image.Image:
    """RGBA or LA flattened onto white: a white RGB canvas, the image pasted through its own
    alpha.  It holds the image and one RGB copy (an RGBA background and `alpha_composite` held
    five full-size copies); the result is the same within one level of a channel."""
    canvas = Image.new("RGB", image.size, _BACKGROUND)
    canvas.paste(image, mask=image)
    return canvas


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale: Pillow's convert() clips at 255, which turns them white.

    The tones are scaled into 0–255 a band of rows at a time, in float32: a whole-image float64
    copy of a legal 49-megapixel 16-bit PNG would be 400 MB, three times its RGB result.
    """
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I" (32-bit integer) or "F" (32-bit float): scale by the brightest value
        _, brightest = image.getextrema()
        brightest = float(brightest) if math.isfinite(brightest) else 1.0
        top = max(brightest, 1.0)
        if image.mode == "I":  # integer images are 8- or 16-bit data more often than not
            top = 255.0 if top <= 255.0 else 65535.0 if top <= 65535.0 else top
    width, height = image.size
    gray = np.empty((height, width), dtype=np.uint8)
    for top_row in range(0, height, CONVERSION_ROWS):
        rows = image.crop((0, top_row, width, min(height, top_row + CONVERSION_ROWS)))
        band = np.array(rows, dtype=np.float32)  # a writable copy of the band, whatever the mode
        np.nan_to_num(band, copy=False, nan=0.0, posinf=top, neginf=0.0)
        band *= 255.0 / top
        band += 0.5  # rounds on the truncating cast below
        np.clip(band, 0.0, 255.0, out=band)
        gray[top_row : top_row + band.shape[0]] = band
    return Image.fromarray(gray).convert("RGB")  # uint8, 2-D: mode "L"


# --- preprocessing, bounded by the output ------------------------------------------------------


def scale_to_fit(width: int, height: int, *, short_side: float, max_long_side: float, enlarge: bool = True) -> float:
    """The factor that brings the short side to `short_side`, unless the long side would then
    pass `max_long_side`; then the long side is `max_long_side` (and the short side smaller).

    Without the cap, a 1×20000 image brought to a short side of 256 is 256×5,120,000 pixels
    (gigabytes); with it, the work is bounded by `short_side` × `max_long_side` whatever the
    image.  `enlarge=False` never scales up.
    """
    scale = min(short_side / min(width, height), max_long_side / max(width, height))
    return scale if enlarge else min(1.0, scale)


def resize_center_crop(
    image: Image.Image, resize: int, crop: int, resample: Image.Resampling = Image.Resampling.BILINEAR
) -> Image.Image:
    """torchvision's `Resize(resize)` then `CenterCrop(crop)` on a PIL image, in one bounded step.

    Only the source region that ends up in the crop is resampled (Pillow's `resize(box=...)`
    reads the neighbouring pixels its filter needs), so the cost is crop × crop whatever the
    aspect ratio: the full `Resize` of a 1×20000 image would be 256×5,120,000 pixels first.  The
    sampling grid is torchvision's (its rounding of sizes and offsets), so the pixels match the
    two transforms'.  Where the scaled image is smaller than the crop, the rest is black, as
    `CenterCrop` pads.
    """
    width, height = image.size
    # torchvision: the short side becomes `resize`, the long side int(resize * long / short).
    if width <= height:
        scaled_width, scaled_height = resize, int(resize * height / width)
    else:
        scaled_width, scaled_height = int(resize * width / height), resize
    left, right, out_width, pad_x = _crop_span(width, scaled_width, crop)
    top, bottom, out_height, pad_y = _crop_span(height, scaled_height, crop)
    resized = image.resize((out_width, out_height), resample, box=(left, top, right, bottom))
    if (out_width, out_height) == (crop, crop):
        return resized
    canvas = Image.new(resized.mode, (crop, crop))  # black, like CenterCrop's padding
    canvas.paste(resized, (pad_x, pad_y))
    return canvas


def _crop_span(side: int, scaled_side: int, crop: int) -> tuple[float, float, int, int]:
    """Along one axis: (source start, source end, output length, padding before)."""
    source_per_scaled = side / scaled_side
    if scaled_side < crop:  # CenterCrop pads: all of the side, centred
        return 0.0, float(side), scaled_side, (crop - scaled_side) // 2
    offset = int(round((scaled_side - crop) / 2.0))  # CenterCrop's own rounding
    return offset * source_per_scaled, (offset + crop) * source_per_scaled, crop, 0


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


def _round_megabytes(size: int) -> str:
    megabytes = size / (1024 * 1024)
    return f"{megabytes:.0f} MB" if megabytes >= 10 else f"{megabytes:.1f} MB"
