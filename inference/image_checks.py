"""Structures in an image's header that declare more than the image needs, refused before decoding.

A JPEG may have at most so many scans (libjpeg walks every block of the image once per scan); a
TIFF's tiles may not be much larger than the image (libtiff allocates a whole tile before reading
it) nor its strips and tiles point past the end of the file.  `inference.images.open_image` runs
these after the size checks, on the header Pillow has parsed and the raw bytes.
"""

from __future__ import annotations

import re

from PIL import Image

from inference.errors import InvalidImage

#: A TIFF tile side may exceed the image's side rounded up to the 16-pixel grid the format asks
#: of tiles, but only up to this: small images tiled at 256, 512 or 1024 are common and cheap.
_TIFF_TILE_ALLOWANCE = 1024

#: A marker: 0xFF then a code that is not a stuffed zero (0x00), a fill byte (0xFF) or a restart
#: marker (RST0–7, which sit inside entropy-coded data).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
#: Markers without a length field besides RSTn (which the pattern skips): TEM and SOI.
_JPEG_STANDALONE = (0x01, 0xD8)


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """Start-of-scan markers of the first image in a JPEG, counted from the markers alone.

    Segments are skipped by their length (an EXIF thumbnail holds markers of its own); after a
    scan's header, the entropy-coded data is searched for the next marker.  Counting stops at the
    first EOI (an MPO's further frames follow it) or once the count passes `stop_after`.  No
    pixel is decoded: a 25 MB file takes milliseconds.
    """
    scans = 0
    position = 2  # after SOI
    while (match := _JPEG_MARKER.search(data, position)) is not None:
        marker = data[match.start() + 1]
        position = match.end()
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_STANDALONE:
            continue
        if marker == _JPEG_SOS:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
        if position + 2 > len(data):
            break
        position += int.from_bytes(data[position : position + 2], "big")
    return scans


def check_jpeg_scans(data: bytes, max_scans: int) -> int:
    """The JPEG's scans, or `InvalidImage` past `max_scans`."""
    # libjpeg walks every block of the image once per scan, so a progressive JPEG of a few MB
    # with tens of thousands of empty scans takes minutes to decode (libjpeg-turbo's own djpeg
    # has -maxscans for this).  Count them first, the way djpeg would refuse them.
    scans = count_jpeg_scans(data, stop_after=max_scans)
    if scans > max_scans:
        raise InvalidImage(
            f"That JPEG has more than {max_scans} scans, far more than any camera or editor writes; "
            "it looks built to be slow to decode."
        )
    return scans


def check_tiff_layout(image: Image.Image, file_size: int) -> None:
    """Tiles and strips against the image and the file, from the tags Pillow has parsed.

    libtiff allocates a whole tile before reading it: a 16×16 image declaring a 46336×46336 tile
    costs gigabytes.  A tile side may exceed the image side only up to the 16-pixel grid TIFF
    asks of tiles, or up to 1024 pixels for small images.  Strips cannot: libtiff bounds a strip
    by the image's height (RowsPerStrip may be "infinite" by the spec).
    """
    tags = image.tag_v2
    width, height = image.size
    tile_width, tile_height = tags.get(322), tags.get(323)  # TileWidth, TileLength
    if tile_width is not None or tile_height is not None:
        for tile_side, side in ((tile_width or 0, width), (tile_height or 0, height)):
            if tile_side > max(-(-side // 16) * 16, _TIFF_TILE_ALLOWANCE):
                raise InvalidImage(
                    f"That TIFF is {width}×{height} pixels but declares tiles of "
                    f"{tile_width}×{tile_height}: refused before decoding."
                )
    # StripOffsets/StripByteCounts, or TileOffsets/TileByteCounts: no data past the end.
    offsets = tags.get(273) or tags.get(324) or ()
    byte_counts = tags.get(279) or tags.get(325) or ()
    for offset, byte_count in zip(_as_tuple(offsets), _as_tuple(byte_counts)):
        if offset + byte_count > file_size:
            raise InvalidImage("That TIFF declares more image data than the file holds: it is truncated or corrupt.")


def _as_tuple(value) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)
