"""The safe decoder: every bad input gets a clear InvalidImage; every good mode becomes RGB."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from inference.errors import InvalidImage
from inference.images import ImageLimits, decode_image


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but whose data is a few bytes: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"hello, this is not an image",
        b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        b"GIF89a",  # a signature and nothing else
    ],
    ids=["text", "svg", "pdf", "bare-signature"],
)
def test_non_images_are_refused(payload):
    with pytest.raises(InvalidImage):
        decode_image(payload)


def test_empty_is_refused():
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"")


def test_truncated_jpeg_is_refused(bobby_jpg):
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(bobby_jpg[: len(bobby_jpg) // 2])


def test_truncated_png_is_refused():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2])


def test_too_many_bytes_is_refused_before_decoding(bobby_jpg):
    with pytest.raises(InvalidImage, match="too large"):
        decode_image(bobby_jpg, ImageLimits(max_bytes=len(bobby_jpg) - 1))


def test_decompression_bomb_is_refused_without_decoding():
    bomb = png_header_only(9000, 9000)  # 81 megapixels claimed by a file of ~100 bytes
    assert len(bomb) < 200
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="megapixels"):
        decode_image(bomb, ImageLimits(max_pixels=50_000_000))
    # Decoding 81 megapixels would take seconds and ~240 MB; refusing takes microseconds.
    assert time.perf_counter() - started < 0.5


def test_giant_bomb_beyond_pillow_limit_is_refused():
    with pytest.raises(InvalidImage):
        decode_image(png_header_only(100_000, 100_000))


def test_pixel_limit_counts_pixels_not_bytes():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, ImageLimits(max_pixels=10_000)).size == (100, 100)
    with pytest.raises(InvalidImage, match="megapixels"):
        decode_image(data, ImageLimits(max_pixels=9_999))


# --- accepted, and made RGB -------------------------------------------------------------------


@pytest.mark.parametrize("format", ["PPM", "PCX", "ICO", "SGI", "TGA", "DDS", "QOI"])
def test_formats_pillow_reads_but_we_do_not_accept_are_refused(format):
    # Every one of these decodes with a bare Image.open: only the allow-list refuses them.
    data = encode(Image.new("RGB", (32, 32), (200, 10, 10)), format)
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    with pytest.raises(InvalidImage, match="not an image I can read"):
        decode_image(data)


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_are_sniffed_from_content(format):
    image = Image.new("RGB", (32, 24), (200, 30, 30))
    decoded = decode_image(encode(image, format))
    assert decoded.mode == "RGB" and decoded.size == (32, 24)
    red, green, blue = decoded.getpixel((16, 12))
    assert red > 150 and green < 80 and blue < 80


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_palette_with_transparency_is_flattened_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    data = encode(image, "PNG", transparency=0)
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)  # transparent → white
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_rgba_is_flattened_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((1, 1), (0, 128, 0, 255))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (0, 128, 0)


def test_cmyk_jpeg_becomes_rgb():
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    red, green, blue = decoded.getpixel((8, 8))
    assert decoded.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_16_bit_grayscale_keeps_its_tones():
    pixels = np.full((8, 8), 32768, dtype=np.uint16)
    pixels[0, 0] = 65535
    data = encode(Image.fromarray(pixels), "PNG")
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert abs(decoded.getpixel((4, 4))[0] - 128) <= 1  # not clipped to white
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "black"), [("L", 0), ("1", 0), ("LA", (0, 255))])
def test_grayscale_and_bilevel_become_rgb(mode, black):
    decoded = decode_image(encode(Image.new(mode, (10, 10), black), "PNG"))
    assert decoded.mode == "RGB" and decoded.getpixel((3, 3)) == (0, 0, 0)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    red, _, blue = decode_image(data).getpixel((5, 5))
    assert red > 200 and blue < 50


def test_draft_mode_decodes_big_jpegs_smaller_but_large_enough(bobby_jpg):
    phone_photo = encode(Image.open(io.BytesIO(bobby_jpg)).convert("RGB").resize((4000, 3000)), "JPEG", quality=90)
    full = decode_image(phone_photo)
    drafted = decode_image(phone_photo, draft_size=(256, 256))
    assert full.size == (4000, 3000)
    assert drafted.size == (500, 375)  # 1/8 scale: the smallest that is still ≥ 256 on each side
    assert decode_image(phone_photo, draft_size=(512, 512)).size == (1000, 750)


# --- found by mutation testing (mutmut over inference/images.py) --------------------------------


def test_a_file_of_exactly_the_byte_limit_is_accepted(bobby_jpg):
    assert decode_image(bobby_jpg, ImageLimits(max_bytes=len(bobby_jpg))).size == Image.open(io.BytesIO(bobby_jpg)).size


def test_the_pixel_refusal_gives_the_size_and_the_limit_in_megapixels():
    # 7 × 357143 = 2,500,001 pixels: "3" megapixels, where a divisor one off would say "2".
    with pytest.raises(InvalidImage) as caught:
        decode_image(png_header_only(7, 357_143), ImageLimits(max_pixels=1_500_001))
    assert str(caught.value) == "That image is too large (7×357143 = 3 megapixels); the limit is 2 megapixels."


def test_a_bomb_past_pillows_own_limit_is_refused_as_too_many_pixels():
    with pytest.raises(InvalidImage) as caught:
        decode_image(png_header_only(100_000, 100_000))
    assert str(caught.value) == "That image has too many pixels to decode safely."


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N"])
def test_16_bit_grayscale_of_either_byte_order_keeps_its_tones(mode):
    from inference.images import to_rgb

    order = {"I;16B": ">", "I;16L": "<", "I;16N": "="}[mode]
    image = Image.frombytes(mode, (3, 1), np.array([0, 32768, 65535], dtype=f"{order}u2").tobytes())
    assert [to_rgb(image).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_transparent_grayscale_is_flattened_on_white():
    image = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    image.putpixel((1, 1), (60, 255))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (60, 60, 60)


def test_draft_mode_also_decodes_a_phone_cameras_mpo_smaller(bobby_jpg):
    photo = Image.open(io.BytesIO(bobby_jpg)).convert("RGB").resize((4000, 3000))
    buffer = io.BytesIO()
    photo.save(buffer, format="MPO", save_all=True, append_images=[photo.resize((400, 300))], quality=90)
    mpo = buffer.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert decode_image(mpo, draft_size=(256, 256)).size == (500, 375)
