"""Hostile (and reference) image files, generated: the tests use them at small sizes, and

    python -m tests.hostile_images DIR

writes the full-size set of issue 12 into DIR, to measure `python -m inference classify` on.
Every file is built from scratch here; none is downloaded or checked in.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def flat_png(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A valid PNG of one colour, written row by row through zlib: a 7000×7000 image is a few
    hundred KB on disk and never exists as pixels in this process."""
    channels = {0: 1, 2: 3}[colour_type]
    row = b"\0" + bytes([0x80]) * (width * channels * bit_depth // 8)  # filter byte + mid-grey
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def gray16_png(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG (Pillow opens it as a high-bit-depth mode)."""
    return flat_png(width, height, bit_depth=16, colour_type=0)


def photo_jpeg(width: int, height: int, *, progressive: bool = False, quality: int = 85) -> bytes:
    """A JPEG with some texture (a smooth gradient plus noise), like a photo, not a flat colour."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, progressive=progressive)
    return buffer.getvalue()


def many_scan_jpeg(width: int, height: int, extra_scans: int) -> bytes:
    """A progressive JPEG followed by `extra_scans` empty AC scans of the luma component.

    Each added scan is a 10-byte SOS segment with no entropy-coded data.  libjpeg accepts it (a
    warning, not an error) and still walks every block of the component once per scan, so
    decoding costs scans × pixels while the file stays small: the attack libjpeg-turbo's
    `djpeg -maxscans` exists for.
    """
    base = photo_jpeg(width, height, progressive=True, quality=75)
    assert base.endswith(b"\xff\xd9")
    # Ls=8, Ns=1, component 1 with Huffman tables 0/0, Ss=1, Se=63, Ah=0, Al=0.
    scan = b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 63, 0x00)
    return base[:-2] + scan * extra_scans + b"\xff\xd9"


def tiff_with_tile(width: int, height: int, tile: int) -> bytes:
    """A tiny little-endian TIFF of width×height pixels whose one tile claims tile×tile pixels.

    The image is legal-sized; the tile is what a decoder allocates before reading it.
    """
    entries = [
        (256, 3, 1, width),  # ImageWidth
        (257, 3, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 8),  # Compression: Adobe deflate, so Pillow hands it to libtiff
        (262, 3, 1, 1),  # Photometric: min-is-black
        (277, 3, 1, 1),  # SamplesPerPixel
        (322, 4, 1, tile),  # TileWidth
        (323, 4, 1, tile),  # TileLength
        (324, 4, 1, 0),  # TileOffsets (patched below)
        (325, 4, 1, 0),  # TileByteCounts (patched below)
    ]
    # A real file's tile holds tile×tile pixels; the hostile one holds 64 bytes of them.
    payload = zlib.compress(b"\0" * (tile * tile if tile <= 1024 else 64))
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = ifd_offset + ifd_size
    patched = {324: data_offset, 325: len(payload)}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = patched.get(tag, value)
        packed_value = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed_value
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_offset) + ifd + payload


def animated_gif(width: int, height: int, frames: int) -> bytes:
    """An animated GIF of `frames` tiny frames: one frame's pixels, many frames' worth of file."""
    images = [Image.new("P", (width, height), index % 2) for index in range(frames)]
    for image in images:
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=10, optimize=False)
    return buffer.getvalue()


#: The measurement set of issue 12, by file name.
FULL_SIZE = {
    "phone_4000x3000.jpg": lambda: photo_jpeg(4000, 3000, quality=90),
    "thin_1x20000.png": lambda: flat_png(1, 20000),
    "wide_20000x1.png": lambda: flat_png(20000, 1),
    "wide_9000x2.png": lambda: flat_png(9000, 2),
    "scans_7000x7000.jpg": lambda: many_scan_jpeg(7000, 7000, 33_000),
    "tile_16x16_46336.tif": lambda: tiff_with_tile(16, 16, 46336),
    "legal_7000x7000.png": lambda: flat_png(7000, 7000),
    "gray16_7000x7000.png": lambda: gray16_png(7000, 7000),
    "legal_49mp_7000x7000.jpg": lambda: photo_jpeg(7000, 7000, quality=80),
}


def main(argv: list[str]) -> int:
    directory = Path(argv[0] if argv else "hostile-images")
    directory.mkdir(parents=True, exist_ok=True)
    for name, make in FULL_SIZE.items():
        data = make()
        (directory / name).write_bytes(data)
        print(f"{name}: {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
