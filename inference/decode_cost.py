"""What decoding an image holds in memory, estimated from its header alone.

`inference.images.open_image` refuses an image whose estimate passes `ImageLimits.max_decode_bytes`,
and a worker's decoder threads hold each image's estimate of its decode budget while it decodes
(`inference.worker.decoding`).  The per-mode numbers are written from what Pillow and
`inference.images.to_rgb` allocate, and checked against measured peak RSS by
tests/test_decode_memory.py (too low or far too high both fail).
"""

from __future__ import annotations

import math

from PIL import ExifTags, Image

#: Rows of a high-bit-depth image `to_rgb` converts at once: bounds its float32 working copy.
CONVERSION_ROWS = 256

#: Bytes Pillow keeps per pixel of a mode.  One for "1", "L" and "P" (even "1" takes a byte),
#: two for the 16-bit modes, and four for all others: Pillow pads 3- and 2-band modes (RGB,
#: YCbCr, LAB, HSV, LA, PA) to four bytes a pixel, and "I" and "F" are 32-bit.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_PIXEL_BYTES_OTHERWISE = 4

#: What `to_rgb` allocates besides its input, in bytes per pixel, by the input's mode; written
#: from the code below it and checked against peak RSS in tests/test_decode_memory.py:
#: RGB is returned as it is; RGBA and LA are pasted onto a white RGB canvas through their own
#: alpha (Pillow pastes both onto RGB directly); the other alpha modes are made RGBA first; high
#: bit depths build an 8-bit gray array, an "L" image over it and the RGB result (plus a band
#: of rows, `_HIGH_BIT_DEPTH_BAND_BYTES`); everything else is one `convert("RGB")`.
_TO_RGB_BYTES = {"RGB": 0, "RGBA": 4, "LA": 4, "PA": 8, "RGBa": 8, "La": 8}
_TO_RGB_ALPHA_PALETTE_BYTES = 8  # "P" with a transparent colour: RGBA, then the canvas
_TO_RGB_HIGH_BIT_DEPTH_BYTES = 6
_TO_RGB_BYTES_OTHERWISE = 4
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
#: Per pixel of a band of `CONVERSION_ROWS` rows: the crop (up to 4), numpy's copy of it
#: (up to 4) and its float32 working copy (4), rounded up.
_HIGH_BIT_DEPTH_BAND_BYTES = 16

#: Pillow's WebP opener keeps libwebp's animation decoder: its canvas (RGBA) and, for the frame,
#: libwebp's own buffers and a copy handed to Pillow.  Measured peak beside the image: 13 (lossy)
#: to 20 (lossless) bytes a pixel; part of it is spent by `Image.open` already.
_WEBP_DECODER_BYTES = 20
#: A JPEG with more than one scan (progressive) is decoded from a buffer of all its DCT
#: coefficients: 64 two-byte values per 8×8 block of each component, at the full size whatever
#: the draft.
_JPEG_BLOCK_BYTES = 64 * 2


def decode_cost(image: Image.Image, *, jpeg_scans: int | None = None) -> int:
    """The peak bytes of decoding an opened image (at its drafted size) and making it RGB.

    Counted: the decoded pixels, the decoder's own buffers where they scale with the image
    (WebP, multi-scan JPEG), an upright copy where the header's EXIF orientation turns or flips
    the image, and what `to_rgb` allocates for the mode.  Reads only the header.  `jpeg_scans`:
    the JPEG's scans where counted already (else Pillow's "progressive" flag says).
    """
    width, height = image.size
    pixels = width * height
    decoded = pixels * _PIXEL_BYTES.get(image.mode, _PIXEL_BYTES_OTHERWISE)
    upright = decoded if header_orientation(image) != 1 else 0
    return decoded + _decoder_bytes(image, jpeg_scans) + upright + _to_rgb_bytes(image)


def _to_rgb_bytes(image: Image.Image) -> int:
    width, height = image.size
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        band = width * min(height, CONVERSION_ROWS) * _HIGH_BIT_DEPTH_BAND_BYTES
        return width * height * _TO_RGB_HIGH_BIT_DEPTH_BYTES + band
    if image.mode == "P" and "transparency" in image.info:
        return width * height * _TO_RGB_ALPHA_PALETTE_BYTES
    return width * height * _TO_RGB_BYTES.get(image.mode, _TO_RGB_BYTES_OTHERWISE)


def _decoder_bytes(image: Image.Image, jpeg_scans: int | None) -> int:
    width, height = image.size
    if image.format == "WEBP":
        return width * height * _WEBP_DECODER_BYTES
    if image.format in ("JPEG", "MPO"):
        multi_scan = jpeg_scans > 1 if jpeg_scans is not None else bool(image.info.get("progressive"))
        return _jpeg_coefficient_bytes(image) if multi_scan else 0
    return 0


def _jpeg_coefficient_bytes(image: Image.Image) -> int:
    # The draft's scale brings the size back to the full one (rounded up: an upper bound).
    scale = image.decoderconfig[0] if getattr(image, "decoderconfig", ()) else 1
    width, height = image.size[0] * scale, image.size[1] * scale
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    total = 0
    for _, h, v, _ in layers:
        # libjpeg rounds each component up to whole MCUs: blocks of 8 pixels, h (v) of them.
        blocks_across = -(-math.ceil(width * h / h_max) // (8 * h)) * h
        blocks_down = -(-math.ceil(height * v / v_max) // (8 * v)) * v
        total += blocks_across * blocks_down * _JPEG_BLOCK_BYTES
    return total


def header_orientation(image: Image.Image) -> int:
    """The EXIF orientation known before decoding (1: upright).

    A PNG's own `getexif` decodes the pixels to look for an eXIf chunk after them; Pillow's
    general one reads only what the header gave (the PNG spec puts eXIf before the image data).
    """
    return int(Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1) or 1)
