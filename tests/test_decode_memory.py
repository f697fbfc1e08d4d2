"""What decoding an image holds in memory: `decode_cost`'s table against peak RSS, the refusal
past `ImageLimits.max_decode_bytes`, and the cheaper flattening of transparency onto white."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from config import Settings
from inference.errors import InvalidImage
from inference.images import ImageLimits, decode_image, open_image, to_rgb
from inference.worker.protocol import WorkerConfig
from tests.conftest import REPO_ROOT

MB = 1024 * 1024
#: The allocator's and Python's own noise in a peak-RSS difference.
NOISE_BYTES = 8 * MB

# --- the estimate against the real peak ----------------------------------------------------------

#: Runs in a fresh interpreter that imports only `inference.images` (and Pillow, numpy): builds
#: each case's file, then decodes it with the peak RSS reset just before.  glibc keeps freed
#: memory and serves the next case from it, so each measurement starts with `malloc_trim(0)`;
#: writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS.
MEASURE = r"""
import ctypes, io, json, sys
import numpy as np
from PIL import Image
from inference.images import decode_image, open_image

libc = ctypes.CDLL("libc.so.6")

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

def encoded(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()

W, H = 3000, 2000
rng = np.random.default_rng(7)
noise = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
rgb = Image.fromarray(noise[..., :3])
exif = Image.Exif()
exif[0x0112] = 6  # Orientation: turn 90° clockwise to view
cases = {
    "RGB PNG": (encoded(rgb, "PNG", compress_level=1), None),
    "RGBA PNG": (encoded(Image.fromarray(noise), "PNG", compress_level=1), None),
    "LA PNG": (encoded(Image.fromarray(noise[..., :2].copy(), "LA"), "PNG", compress_level=1), None),
    "I;16 PNG": (encoded(Image.fromarray(noise[..., :2].copy().view(np.uint16)[..., 0]), "PNG", compress_level=1), None),
    "L PNG": (encoded(Image.fromarray(noise[..., 0]), "PNG", compress_level=1), None),
    "P GIF, transparent": (encoded(rgb.quantize(200), "GIF", transparency=3), None),
    "JPEG 6000x4000, draft": (encoded(rgb.resize((6000, 4000)), "JPEG", quality=80), (1500, 1500)),
    "JPEG, EXIF orientation 6": (encoded(rgb, "JPEG", quality=80, exif=exif.tobytes()), None),
    "progressive JPEG": (encoded(rgb, "JPEG", quality=80, progressive=True), None),
    "WebP": (encoded(rgb, "WEBP", quality=80, method=0), None),
}
for name, (data, draft_size) in cases.items():
    opened = open_image(data, draft_size=draft_size)
    mode, size, estimate = opened.image.mode, opened.image.size, opened.decode_bytes
    del opened
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = status("VmRSS")
    image = decode_image(data, draft_size=draft_size)
    peak = status("VmHWM") - before
    assert image.mode == "RGB"
    del image
    print(json.dumps({"case": name, "mode": mode, "size": size, "estimate": estimate, "measured": peak}))
"""


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    print("\ncase                       mode   size        estimate MB  measured MB")
    for row in rows:
        size = "×".join(map(str, row["size"]))
        print(f"{row['case']:26} {row['mode']:6} {size:11} {row['estimate'] / MB:11.1f} {row['measured'] / MB:12.1f}")
    return {row["case"]: row for row in rows}


CASES = [
    "RGB PNG",
    "RGBA PNG",
    "LA PNG",
    "I;16 PNG",
    "L PNG",
    "P GIF, transparent",
    "JPEG 6000x4000, draft",
    "JPEG, EXIF orientation 6",
    "progressive JPEG",
    "WebP",
]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("case", CASES)
def test_the_estimate_covers_the_real_peak_and_not_much_more(measured, case):
    row = measured[case]
    assert row["measured"] > 4 * MB, row  # the image's pixels were counted at all
    assert row["measured"] <= row["estimate"] + NOISE_BYTES, row
    assert row["estimate"] <= 1.6 * row["measured"] + NOISE_BYTES, row


def test_the_cases_are_the_modes_they_stand_for(measured):
    modes = {case: row["mode"] for case, row in measured.items()}
    assert modes == {
        "RGB PNG": "RGB",
        "RGBA PNG": "RGBA",
        "LA PNG": "LA",
        "I;16 PNG": "I;16",
        "L PNG": "L",
        "P GIF, transparent": "P",
        "JPEG 6000x4000, draft": "RGB",
        "JPEG, EXIF orientation 6": "RGB",
        "progressive JPEG": "RGB",
        "WebP": "RGB",
    }
    assert measured["JPEG 6000x4000, draft"]["size"] == [3000, 2000]  # drafted to 1/2


# --- the budget's refusal ------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_over_the_decode_budget_is_refused_in_one_line_before_decoding(loads):
    data = png(Image.new("RGBA", (1000, 1000), (0, 0, 255, 128)))  # 4 MB of RGBA + 4 MB of RGB
    with pytest.raises(InvalidImage) as caught:
        decode_image(data, ImageLimits(max_decode_bytes=4 * MB))
    assert str(caught.value) == (
        "That image would take about 7.6 MB of memory to decode; this bot decodes at most 4.0 MB "
        "at a time (a JPEG, or a smaller image, will do)."
    )
    assert loads == []
    assert decode_image(data, ImageLimits(max_decode_bytes=8 * MB)).size == (1000, 1000)
    assert decode_image(data, ImageLimits(max_decode_bytes=0)).size == (1000, 1000)  # 0: no limit


def png_header(width: int, height: int, color_type: int) -> bytes:
    """A PNG whose header claims width×height (8 bits; 2: RGB, 6: RGBA) and whose data is a few bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_the_default_budget_takes_a_legal_49_megapixel_rgb_png_but_not_an_rgba_one(loads):
    assert open_image(png_header(7000, 7000, 2)).decode_bytes == 7000 * 7000 * 4  # 187 MB
    with pytest.raises(InvalidImage, match=r"^That image would take about 374 MB of memory to decode; this bot decodes at most 256 MB"):
        open_image(png_header(7000, 7000, 6))
    assert loads == []


def test_the_orientation_counted_is_the_one_the_header_gives(loads):
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buffer, format="PNG", exif=exif.tobytes())
    opened = open_image(buffer.getvalue())
    assert loads == []  # a PNG's own getexif would have decoded it
    assert opened.transpose and opened.decode_bytes == 40 * 20 * 4 * 2
    assert opened.decode().size == (20, 40)


def test_the_budget_comes_from_the_settings():
    settings = Settings.from_env({"DECODE_MEMORY_MB": "64"}, env_file=None)
    assert ImageLimits.from_settings(settings).max_decode_bytes == 64 * MB
    assert WorkerConfig.from_settings("classify", settings).image_limits().max_decode_bytes == 64 * MB
    assert ImageLimits.from_settings(Settings()) == ImageLimits()


# --- flattening transparency ---------------------------------------------------------------------


def old_flatten(image: Image.Image) -> Image.Image:
    """What `to_rgb` did before: an RGBA white background, `alpha_composite`, then RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def random_image(mode: str) -> Image.Image:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    pixels[:8, :, 3] = 0  # fully transparent rows, fully opaque rows, and everything between
    pixels[8:16, :, 3] = 255
    rgba = Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        return rgba.convert("LA")
    if mode == "P":
        palette = rgba.convert("RGB").quantize(64)
        palette.info["transparency"] = 5
        return palette
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_flattening_onto_white_matches_alpha_compositing(mode):
    image = random_image(mode)
    new, old = np.asarray(to_rgb(image), dtype=int), np.asarray(old_flatten(image), dtype=int)
    assert new.shape == old.shape == (64, 96, 3)
    assert np.abs(new - old).max() <= 1
    if mode == "RGBA":
        assert (new[:8] == 255).all()  # transparent: the white background
        assert (new[8:16] == np.asarray(image)[8:16, :, :3]).all()  # opaque: the pixels themselves
