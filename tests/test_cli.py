"""`python -m inference …` as a user runs it: the output contract, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import IMAGES, REPO_ROOT


def run_cli(*args: str, env_extra: dict[str, str] | None = None, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # Never the user's cache, never the network: an empty weights dir unless the test says.
        "WEIGHTS_DIR": str(tmp_path / "no-weights"),
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "AUTO_DOWNLOAD": "0",
        **(env_extra or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "inference", *args],
        cwd=tmp_path,  # so no stray .env of the developer's is read
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_classify_json_contract(tmp_path):
    result = run_cli("classify", str(IMAGES / "bobby.jpg"), "--json", "--top", "3", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["model"] == "efficientnet_lite0"
    predictions = answer["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["label"] == "golden retriever"
    assert 85.0 < predictions[0]["probability"] <= 100.0
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)


def test_classify_plain_output(tmp_path):
    result = run_cli("classify", str(IMAGES / "horse.jpg"), "--top", "2", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("sorrel") and "%" in lines[0]


def test_not_an_image_is_one_line_on_stderr(tmp_path):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("this is not a photo")
    line = assert_one_line_error(run_cli("classify", str(text_file), tmp_path=tmp_path))
    assert "not an image" in line


def test_missing_file_is_one_line_on_stderr(tmp_path):
    line = assert_one_line_error(run_cli("classify", str(tmp_path / "nope.jpg"), tmp_path=tmp_path))
    assert "nope.jpg" in line


def test_missing_zebra_weights_say_how_to_get_them(tmp_path):
    line = assert_one_line_error(
        run_cli("zebra", str(IMAGES / "horse.jpg"), "--output", str(tmp_path / "z.png"), tmp_path=tmp_path)
    )
    assert "weights download" in line and "horse2zebra" in line


def test_zebra_with_an_explicit_checkpoint(tmp_path, generated_weights_dir):
    checkpoint = generated_weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth"
    output = tmp_path / "out" / "zebra.png"
    result = run_cli(
        "zebra", str(IMAGES / "horse.jpg"), "--output", str(output), "--weights", str(checkpoint), "--size", "128",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert min(image.size) == 128 and image.size[0] % 4 == 0 and image.size[1] % 4 == 0


def test_zebra_from_the_weights_dir_writes_jpeg_when_asked(tmp_path, generated_weights_dir):
    output = tmp_path / "zebra.jpg"
    result = run_cli(
        "zebra", str(IMAGES / "horse.jpg"), "--output", str(output), "--size", "64",
        env_extra={"WEIGHTS_DIR": str(generated_weights_dir)}, tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == "JPEG" and min(image.size) == 64


def test_wrong_checkpoint_layout_is_one_line(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"model.1.weight": torch.zeros(1)}, wrong)
    line = assert_one_line_error(
        run_cli("zebra", str(IMAGES / "horse.jpg"), "-o", str(tmp_path / "z.png"), "--weights", str(wrong), tmp_path=tmp_path)
    )
    assert "missing" in line


def test_caption_json_contract(tmp_path, generated_weights_dir):
    result = run_cli(
        "caption", str(IMAGES / "bobby.jpg"), "--json", "--beam", "2",
        "--weights-dir", str(generated_weights_dir / "captioner"), tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"caption"} and isinstance(answer["caption"], str)
    assert len(answer["caption"].split()) <= 16


def test_missing_caption_weights_say_how_to_get_them(tmp_path):
    line = assert_one_line_error(run_cli("caption", str(IMAGES / "bobby.jpg"), tmp_path=tmp_path))
    assert "weights download" in line


def test_torch_hub_loads_the_zebra_generator(generated_weights_dir):
    generator = torch.hub.load(
        str(REPO_ROOT), "zebra_generator", source="local", pretrained=True, weights_dir=str(generated_weights_dir)
    )
    assert sum(p.numel() for p in generator.parameters()) == 11_378_179
    with torch.inference_mode():
        assert generator(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
