"""Files built to cost more than they show: each is refused before decoding, or answered with
the memory of an ordinary photo, by the shared decoder and by every model's preprocessing.

The files come from `tests.hostile_images`, at sizes small enough for a fast suite; the
full-size set (`python -m tests.hostile_images DIR`) is what the README's figures measure.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import GifImagePlugin, Image

from config import Settings
from inference.errors import InvalidImage
from inference.image_checks import count_jpeg_scans
from inference.images import ImageLimits, decode_image, resize_center_crop, to_rgb
from inference.models.captioner import CaptionPipeline
from inference.models.classifier import CenterCropPreprocessing
from inference.models.cyclegan import ZebraPipeline
from tests.conftest import REPO_ROOT
from tests.hostile_images import (
    animated_gif,
    flat_png,
    gray16_png,
    many_scan_jpeg,
    photo_jpeg,
    png_chunk,
    tiff_with_tile,
)

#: No limit on the aspect ratio: the preprocessing alone must then keep thin images cheap.
NO_ASPECT_LIMIT = ImageLimits(max_aspect_ratio=float("inf"))
THIN_SIZES = [(1, 20000), (20000, 1), (9000, 2)]


@pytest.fixture
def resizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image Pillow resamples to: the big allocations of preprocessing."""
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return sizes


# --- thin and extreme images ---------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), THIN_SIZES, ids=lambda v: str(v))
def test_thin_images_are_refused_with_their_size_before_decoding(width, height, loads):
    with pytest.raises(InvalidImage, match=rf"^That image is {width}×{height} pixels: too thin to use"):
        decode_image(flat_png(width, height))
    assert loads == []


def test_the_aspect_limit_is_inclusive_and_a_setting():
    limits = ImageLimits.from_settings(Settings(max_image_aspect_ratio=4))
    assert decode_image(flat_png(400, 100), limits).size == (400, 100)
    with pytest.raises(InvalidImage, match="at most 4 times"):
        decode_image(flat_png(401, 100), limits)


@pytest.mark.parametrize(("width", "height"), THIN_SIZES, ids=lambda v: str(v))
def test_classifier_preprocessing_of_thin_images_is_bounded_by_its_crop(width, height, resizes):
    image = decode_image(flat_png(width, height), NO_ASPECT_LIMIT)
    preprocessing = CenterCropPreprocessing(256, 224, (0.5,) * 3, (0.5,) * 3)
    started = time.perf_counter()
    tensor = preprocessing(image)
    assert tensor.shape == (3, 224, 224)
    # torchvision's Resize(256) alone would resample to 256×5,120,000 pixels (several GB).
    assert resizes and all(w * h <= 224 * 224 for w, h in resizes)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(("width", "height"), THIN_SIZES, ids=lambda v: str(v))
def test_zebra_and_caption_preprocessing_of_thin_images_is_bounded(width, height, resizes):
    image = decode_image(flat_png(width, height), NO_ASPECT_LIMIT)
    # Preprocessing reads only the pipeline's size: no weights needed to run it.
    zebra = ZebraPipeline.preprocess(SimpleNamespace(size=256), image)
    caption = CaptionPipeline.preprocess(SimpleNamespace(size=512), image)
    assert zebra.shape[0] == caption.shape[0] == 3
    # CycleGAN: the long side at most 4 × 256 (its aspect cap); captioner: at most 512.
    assert max(zebra.shape[1:]) <= 1024 and max(caption.shape[1:]) <= 512
    assert all(w * h <= 512 * 512 for w, h in resizes)


def test_thin_images_cost_no_more_memory_than_a_small_photo(tmp_path):
    """Peak resident memory of a fresh process, after its imports, across all three thin
    images and the whole classifier preprocessing (the old Resize(256) peaked at 5.9 GB)."""
    for width, height in THIN_SIZES:
        (tmp_path / f"{width}x{height}.png").write_bytes(flat_png(width, height))
    script = f"""
import resource, sys
from pathlib import Path
from inference.images import ImageLimits, decode_image
from inference.models.classifier import CenterCropPreprocessing
from inference.models.cyclegan import ZebraPipeline
from types import SimpleNamespace
preprocessing = CenterCropPreprocessing(256, 224, (0.5,) * 3, (0.5,) * 3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sorted(Path({str(tmp_path)!r}).glob("*.png")):
    image = decode_image(path.read_bytes(), ImageLimits(max_aspect_ratio=float("inf")))
    preprocessing(image)
    ZebraPipeline.preprocess(SimpleNamespace(size=256), image)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr
    growth_kb = int(result.stdout.split()[-1])
    assert growth_kb < 50 * 1024


def test_resize_center_crop_samples_as_torchvision_does():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for width, height in [(640, 427), (225, 1000), (3000, 225), (100, 50)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        reference = transforms.CenterCrop(224)(transforms.Resize(256, antialias=True)(image))
        ours = resize_center_crop(image, 256, 224)
        difference = np.abs(np.asarray(reference, dtype=int) - np.asarray(ours, dtype=int))
        assert ours.size == (224, 224) and difference.max() <= 1, (width, height)


def test_resize_center_crop_pads_like_center_crop_when_the_resize_is_smaller():
    from torchvision import transforms

    image = Image.new("RGB", (60, 50), (200, 100, 50))
    reference = transforms.CenterCrop(224)(transforms.Resize(200, antialias=True)(image))
    ours = resize_center_crop(image, 200, 224)
    assert np.array_equal(np.asarray(reference), np.asarray(ours))
    assert ours.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("weights_name", "sizes"),
    [
        ("ResNet101_Weights.DEFAULT", (232, 224)),  # bilinear
        ("ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1", (384, 384)),  # bicubic
    ],
)
def test_classifier_preprocessing_follows_the_torchvision_weights_recipe(weights_name, sizes):
    import torchvision

    enum_name, member = weights_name.split(".")
    weights = getattr(torchvision.models, enum_name)[member]
    preprocessing = CenterCropPreprocessing.from_weights(weights)
    assert (preprocessing.resize, preprocessing.crop) == sizes
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert torch.allclose(preprocessing(image), weights.transforms()(image), atol=0.02)


# --- JPEG scans -------------------------------------------------------------------------------


def test_jpeg_with_thousands_of_scans_is_refused_fast_before_decoding(loads):
    data = many_scan_jpeg(1024, 1024, 3000)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(data)
    assert time.perf_counter() - started < 0.2
    assert loads == []


def test_real_encoders_scan_counts_pass():
    progressive = photo_jpeg(640, 480, progressive=True)
    assert count_jpeg_scans(progressive) == 10  # libjpeg's standard progressive script
    assert count_jpeg_scans(photo_jpeg(640, 480)) == 1
    assert decode_image(progressive, ImageLimits(max_jpeg_scans=10)).size == (640, 480)
    with pytest.raises(InvalidImage, match="more than 9 scans"):
        decode_image(progressive, ImageLimits(max_jpeg_scans=9))


def test_scan_count_skips_segments_and_stops_at_the_first_image():
    # An EXIF segment full of start-of-scan markers (as an embedded thumbnail holds) is skipped
    # by its length; a second JPEG after the first one's end (an MPO's next frame) is not counted.
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=b"Exif\0\0" + b"\xff\xda\x00\x08" * 500)
    with_exif = buffer.getvalue()
    assert count_jpeg_scans(with_exif) == 1
    assert count_jpeg_scans(with_exif + many_scan_jpeg(64, 64, 500)) == 1
    assert decode_image(with_exif).size == (64, 64)


# --- TIFF tiles and strips ----------------------------------------------------------------------


def test_tiff_declaring_a_giant_tile_is_refused_before_decoding(loads):
    data = tiff_with_tile(16, 16, 46336)  # libtiff would allocate 2 GB for the tile
    assert len(data) < 200
    with pytest.raises(InvalidImage, match=r"16×16 pixels but declares tiles of 46336×46336"):
        decode_image(data)
    assert loads == []


@pytest.mark.parametrize("tile", [16, 256, 1024])
def test_tiff_with_tiles_a_real_encoder_writes_is_decoded(tile):
    assert decode_image(tiff_with_tile(16, 16, tile)).size == (16, 16)


def test_tiff_whose_strips_point_past_the_file_is_refused(loads):
    data = bytearray(_strip_tiff(64, 64))
    image = Image.open(io.BytesIO(bytes(data)))
    offset = image.tag_v2[273][0]
    # StripByteCounts is the last tag written; make it claim 1 GB.
    position = bytes(data).rindex(struct.pack("<HHI", 279, 4, 1))
    data[position + 8 : position + 12] = struct.pack("<I", 1 << 30)
    assert offset < len(data)
    with pytest.raises(InvalidImage, match="more image data than the file holds"):
        decode_image(bytes(data))
    assert loads == []


def _strip_tiff(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 7).save(buffer, format="TIFF")
    return buffer.getvalue()


# --- PNG chunks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deflated_200_mb() -> bytes:
    compressor = zlib.compressobj(9)
    return b"".join(compressor.compress(bytes(1 << 20)) for _ in range(200)) + compressor.flush()


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
@pytest.mark.parametrize("where", ["before IDAT", "after IDAT"])
def test_png_chunks_that_inflate_to_200_mb_are_refused_without_inflating(kind, where, deflated_200_mb):
    # Pillow stops compressed text and ICC chunks at PngImagePlugin.MAX_TEXT_CHUNK (1 MB).
    chunk = png_chunk(kind, b"name\0\0" + deflated_200_mb)
    base = flat_png(64, 64)
    at = base.index(b"IDAT" if where == "before IDAT" else b"IEND") - 4
    # Pillow refuses the oversized chunk as it reads it: in the header before IDAT, while
    # loading after it.  The message says which, so a refusal for another reason fails here.
    refusal = "its header cannot be read" if where == "before IDAT" else "truncated or corrupt"
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImage, match=refusal):
            decode_image(base[:at] + chunk + base[at:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


# --- frames --------------------------------------------------------------------------------------


def test_only_the_first_frame_of_an_animation_is_decoded(monkeypatch):
    # Every frame change, `seek` and `n_frames` included, goes through `_seek`.
    seeks: list[int] = []
    original = GifImagePlugin.GifImageFile._seek

    def spy(self, frame, *args, **kwargs):
        seeks.append(frame)
        return original(self, frame, *args, **kwargs)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", spy)
    data = animated_gif(64, 64, 500)
    started = time.perf_counter()
    red, _, blue = decode_image(data).getpixel((5, 5))
    assert red > 200 and blue < 50  # frame 0 is red
    assert [frame for frame in seeks if frame > 0] == []
    assert time.perf_counter() - started < 0.5


def test_gif_frame_larger_than_its_screen_is_refused_before_decoding(loads):
    # A 1×1 logical screen whose first frame claims 8000×8000: Pillow grows the image to the
    # frame while reading the header, and the pixel limit sees the grown size.
    gif = (
        b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
        + b"\x2c" + struct.pack("<HHHHB", 0, 0, 8000, 8000, 0) + bytes([2, 2, 0x4C, 0x01, 0]) + b"\x3b"
    )
    with pytest.raises(InvalidImage, match="8000×8000 = 64 megapixels"):
        decode_image(gif)
    assert loads == []


@pytest.mark.parametrize("format", ["WEBP", "PNG"])
def test_animated_webp_and_png_give_their_first_frame(format):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=format, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    red, _, blue = decode_image(buffer.getvalue()).getpixel((5, 5))
    assert red > 200 and blue < 50


# --- high bit depth ------------------------------------------------------------------------------


def test_16_bit_grayscale_converts_without_whole_image_float_copies():
    image = Image.open(io.BytesIO(gray16_png(2000, 2000)))
    image.load()
    assert image.mode == "I;16"
    tracemalloc.start()  # numpy's buffers are traced; Pillow's own image memory is not
    try:
        rgb = to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.getpixel((7, 7)) == (128, 128, 128)
    # The 8-bit result (4 MB) and a band of rows: less than one float32 copy of the image
    # (16 MB); the whole-image float64 arithmetic this replaces peaked above 64 MB.
    assert peak < 2000 * 2000 * 4


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [0, 255], [0, 255]),  # 8-bit data in a 32-bit mode
        ("I", [0, 65535], [0, 255]),  # 16-bit data
        ("I", [-5, 1_000_000], [0, 255]),
        ("F", [0.0, 0.5], [0, 128]),  # scaled by the brightest value, at least 1.0
        ("F", [float("nan"), 2.0], [0, 255]),
        ("F", [0.0, float("inf")], [0, 255]),  # infinity is white; no crash, no warning
    ],
)
def test_32_bit_modes_are_scaled_into_8_bits(mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.frombytes(mode, (2, 1), np.array(values, dtype=dtype).tobytes())
    with np.errstate(all="raise"):
        rgb = to_rgb(image)
    assert [rgb.getpixel((x, 0))[0] for x in range(2)] == expected


# --- as a user meets them ----------------------------------------------------------------------


def test_classify_command_refuses_in_one_line(tmp_path):
    # The worker and the CLI share `decode_image`; one run shows the message as a user sees it.
    (tmp_path / "thin.png").write_bytes(flat_png(1, 20000))
    result = subprocess.run(
        [sys.executable, "-m", "inference", "classify", str(tmp_path / "thin.png")],
        cwd=tmp_path,  # no stray .env
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "WEIGHTS_DIR": str(tmp_path / "weights")},
        capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "That image is 1×20000 pixels: too thin to use" in lines[0] and result.stdout == ""


# --- settings ------------------------------------------------------------------------------------


def test_limits_come_from_the_environment():
    settings = Settings.from_env({"MAX_IMAGE_ASPECT_RATIO": "8", "MAX_JPEG_SCANS": "12"}, env_file=None)
    limits = ImageLimits.from_settings(settings)
    assert (limits.max_aspect_ratio, limits.max_jpeg_scans) == (8.0, 12)
    assert ImageLimits.from_settings(Settings()) == ImageLimits()


# --- found by mutation testing (mutmut over inference/images.py) --------------------------------


def _tiled_tiff(width: int, height: int, tile_width: int | None, tile_height: int | None, *, byte_count: int | None = None) -> bytes:
    """Like `tiff_with_tile`, with the tile's sides apart (either tag may be left out) and the
    TileByteCounts free to claim more than the file holds."""
    tile_pixels = (tile_width or width) * (tile_height or height)
    payload = zlib.compress(b"\0" * (tile_pixels if tile_pixels <= 1 << 22 else 64))
    entries = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1)]
    entries += [(322, 4, tile_width)] if tile_width is not None else []
    entries += [(323, 4, tile_height)] if tile_height is not None else []
    data_offset = 8 + 2 + 12 * (len(entries) + 2) + 4
    entries += [(324, 4, data_offset), (325, 4, len(payload) if byte_count is None else byte_count)]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed_value = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed_value
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + payload


@pytest.mark.parametrize(("tile_width", "tile_height"), [(46336, 16), (16, 46336), (46336, None), (None, 46336)])
def test_tiff_declaring_a_tile_giant_along_one_side_only_is_refused(tile_width, tile_height, loads):
    with pytest.raises(InvalidImage, match=rf"16×16 pixels but declares tiles of {tile_width}×{tile_height}"):
        decode_image(_tiled_tiff(16, 16, tile_width, tile_height))
    assert loads == []


def test_tiff_tiles_may_reach_the_16_pixel_grid_past_a_large_image_and_no_further():
    # 1100 pixels round up to 1104 on the grid, past the 1024-pixel allowance for small images.
    assert decode_image(_tiled_tiff(1100, 32, 1104, 32)).size == (1100, 32)
    with pytest.raises(InvalidImage, match="declares tiles of 1120×32"):
        decode_image(_tiled_tiff(1100, 32, 1120, 32))


def test_tiff_whose_tiles_point_past_the_file_is_refused(loads):
    data = _tiled_tiff(16, 16, 16, 16, byte_count=1 << 30)
    with pytest.raises(InvalidImage) as caught:
        decode_image(data)
    assert str(caught.value) == "That TIFF declares more image data than the file holds: it is truncated or corrupt."
    assert loads == []


def test_jpeg_scan_refusal_says_why_in_full():
    with pytest.raises(InvalidImage) as caught:
        decode_image(many_scan_jpeg(64, 64, 200))
    assert str(caught.value) == (
        "That JPEG has more than 100 scans, far more than any camera or editor writes; "
        "it looks built to be slow to decode."
    )


def _empty_scans(count: int) -> bytes:
    # As in `many_scan_jpeg`: empty AC scans of the luma component.
    return (b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 63, 0x00)) * count


def test_a_tem_marker_does_not_end_the_scan_count(loads):
    # TEM (0xFF01) has no length and libjpeg skips it: it must not hide the scans after it.
    base = photo_jpeg(64, 64, progressive=True)
    data = base[:-2] + b"\xff\x01" + _empty_scans(500) + b"\xff\xd9"
    assert count_jpeg_scans(data) == 10 + 500
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(data)
    assert loads == []


def test_a_first_segment_holding_an_end_marker_does_not_end_the_scan_count(loads):
    # Cameras write EXIF (with a thumbnail, ending in FFD9) as the first segment after SOI.
    exif = b"Exif\0\0" + b"\xff\xd8thumbnail\xff\xd9"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(exif)) + exif
    data = many_scan_jpeg(64, 64, 500)
    data = data[:2] + app1 + data[2:]
    assert count_jpeg_scans(data) == 10 + 500
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(data)
    assert loads == []


def test_a_jpeg_cut_right_after_a_marker_is_counted_and_refused_as_truncated():
    progressive = photo_jpeg(64, 64, progressive=True)
    cut = progressive[: progressive.index(b"\xff\xc4", progressive.index(b"\xff\xda")) + 2]
    assert count_jpeg_scans(cut) == 1
    assert count_jpeg_scans(b"\xff\xd8\xff\xda") == 1
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(cut)


def test_limits_from_settings_carry_the_byte_and_pixel_limits_too():
    settings = Settings.from_env(
        {"MAX_IMAGE_BYTES": "1000", "MAX_IMAGE_PIXELS": "2000", "MAX_IMAGE_ASPECT_RATIO": "8", "MAX_JPEG_SCANS": "12"},
        env_file=None,
    )
    assert ImageLimits.from_settings(settings) == ImageLimits(
        max_bytes=1000, max_pixels=2000, max_aspect_ratio=8.0, max_jpeg_scans=12
    )


def test_a_file_over_the_byte_limit_is_told_both_sizes():
    data = b"\0" * 1_311_245  # 1.2505 MiB: one byte in a thousand more or less changes the rounding
    with pytest.raises(InvalidImage) as caught:
        decode_image(data, ImageLimits(max_bytes=1024 * 1024))
    assert str(caught.value) == "That file is too large (1.3 MB); the limit is 1.0 MB."


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [0, 100, 200], [0, 100, 200]),  # 8-bit data keeps its tones (not stretched to white)
        ("I", [0, 256, 1000], [0, 1, 4]),  # past 255: 16-bit data, on the 16-bit scale
        ("I", [0, 50_000, 100_000], [0, 128, 255]),  # past 65535: scaled by the brightest
        ("F", [-500.0, 500.0, 1000.0], [0, 128, 255]),  # scaled by the brightest; negatives black
        ("F", [float("-inf"), 1.0, float("inf")], [0, 255, 255]),  # no finite brightest: scale 1.0
    ],
)
def test_32_bit_tones_keep_their_scale(mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.frombytes(mode, (3, 1), np.array(values, dtype=dtype).tobytes())
    rgb = to_rgb(image)
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == expected


def test_high_bit_depth_is_converted_in_bands_of_rows(monkeypatch):
    image = Image.open(io.BytesIO(gray16_png(10, 600)))
    image.load()
    crops: list[tuple[int, int, int, int]] = []
    original = Image.Image.crop

    def spy(self, box=None):
        crops.append(tuple(box))
        return original(self, box)

    monkeypatch.setattr(Image.Image, "crop", spy)
    assert to_rgb(image).getpixel((5, 599)) == (128, 128, 128)
    assert crops == [(0, 0, 10, 256), (0, 256, 10, 512), (0, 512, 10, 600)]


def test_an_mpo_whose_first_frame_has_thousands_of_scans_is_refused(loads):
    # Phone cameras write MPO (JPEG frames one after another); its first frame is a JPEG.
    first = Image.open(io.BytesIO(photo_jpeg(64, 64, progressive=True)))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[first.copy()], progressive=True)
    mpo = buffer.getvalue()
    end_of_first = mpo.index(b"\xff\xd9")
    data = mpo[:end_of_first] + _empty_scans(500) + mpo[end_of_first:]
    assert Image.open(io.BytesIO(data)).format == "MPO"
    loads.clear()  # building the file decoded its frames; from here on, nothing may be
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(data)
    assert loads == []
