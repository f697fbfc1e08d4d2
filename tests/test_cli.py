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
    assert answer["runtime"] in ("onnx", "torch")  # INFERENCE_RUNTIME=auto: whichever its export measured faster
    predictions = answer["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["label"] == "golden retriever"
    assert 85.0 < predictions[0]["probability"] <= 100.0
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)


def test_the_cli_runs_the_model_in_the_runtime_it_is_told(tmp_path):
    for runtime in ("torch", "onnx"):
        result = run_cli(
            "classify", str(IMAGES / "bobby.jpg"), "--json", tmp_path=tmp_path, env_extra={"INFERENCE_RUNTIME": runtime}
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["runtime"] == runtime and answer["predictions"][0]["label"] == "golden retriever"


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
    assert set(answer) == {"caption", "runtime"} and isinstance(answer["caption"], str)
    assert answer["runtime"] == "torch"  # files named by hand (--weights-dir) are read by the torch pipeline
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


# --- inputs and outputs that are not plain files ----------------------------------------------
# The two that would hang or eat memory if they regressed run in a child process with a time
# limit; the others call `main` in this process (the same code, without the start-up cost).


def run_cli_quickly(*args: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`run_cli`, but a hang fails the test within `timeout` seconds instead of four minutes."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "inference", *args],
            cwd=tmp_path,
            env={**os.environ, "WEIGHTS_DIR": str(tmp_path / "no-weights"), "AUTO_DOWNLOAD": "0"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"python -m inference {' '.join(args)} still running after {timeout} s")


@pytest.fixture
def run_main(tmp_path, monkeypatch, capsys):
    """Calls `inference.cli.main` in this process → a CompletedProcess-like result."""
    from inference.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("AUTO_DOWNLOAD", "0")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        returncode = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, captured.out, captured.err)

    return run


def test_a_fifo_as_input_is_refused_at_once(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: reading it would wait forever
    result = run_cli_quickly("classify", str(fifo), tmp_path=tmp_path)
    line = assert_one_line_error(result)
    assert result.returncode in (1, 2)
    assert "photo.jpg" in line and "a FIFO, not a regular file" in line


def test_a_device_as_input_is_refused_not_read(tmp_path):
    result = run_cli_quickly("classify", "/dev/zero", tmp_path=tmp_path, timeout=30)
    line = assert_one_line_error(result)
    assert result.returncode in (1, 2)
    assert "/dev/zero" in line and "character device" in line


@pytest.mark.parametrize("command", ["caption", "zebra"])
def test_every_command_refuses_a_fifo(tmp_path, run_main, command):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    extra = ["--output", str(tmp_path / "z.png")] if command == "zebra" else []
    line = assert_one_line_error(run_main(command, str(fifo), *extra))
    assert "a FIFO, not a regular file" in line


def test_a_directory_as_input_is_still_refused(tmp_path, run_main):
    line = assert_one_line_error(run_main("classify", str(tmp_path)))
    assert "directory" in line


def test_an_input_larger_than_the_limit_is_refused_without_reading_it_all(tmp_path, run_main):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as file:
        file.truncate(3 * 1024 * 1024)  # sparse: costs no disk
    line = assert_one_line_error(run_main("classify", str(big), MAX_IMAGE_BYTES=str(1024 * 1024)))
    assert "big.jpg is larger than the 1 MB" in line


def test_an_output_that_is_a_directory_is_one_line(tmp_path, run_main):
    folder = tmp_path / "out"
    folder.mkdir()
    result = run_main("zebra", str(IMAGES / "horse.jpg"), "--output", str(folder))
    line = assert_one_line_error(result)
    assert result.returncode in (1, 2)
    assert "is a directory" in line and str(folder) in line


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, run_main):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("a file, not a folder")
    result = run_main("zebra", str(IMAGES / "horse.jpg"), "--output", str(not_a_folder / "z.png"))
    line = assert_one_line_error(result)
    assert result.returncode in (1, 2) and "z.png" in line
    line = assert_one_line_error(run_main("zebra", str(IMAGES / "horse.jpg"), "-o", str(tmp_path / "z.nosuchformat")))
    assert "unknown image extension" in line
    if os.geteuid() != 0:  # root writes anywhere: the permission check only bites for others
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = assert_one_line_error(run_main("zebra", str(IMAGES / "horse.jpg"), "-o", str(locked / "z.png")))
        assert "permission denied" in line.lower()


def test_the_output_is_checked_before_the_model_runs(tmp_path, run_main, generated_weights_dir, monkeypatch):
    """With working weights, the output check still comes first (nothing is computed in vain),
    and an output folder that does not exist yet is still created."""
    from inference.models import cyclegan

    checkpoint = generated_weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth"
    folder = tmp_path / "taken.png"
    folder.mkdir()
    loads = []
    real_from_checkpoint = cyclegan.ZebraPipeline.from_checkpoint
    monkeypatch.setattr(
        cyclegan.ZebraPipeline, "from_checkpoint", lambda *a, **k: loads.append(a) or real_from_checkpoint(*a, **k)
    )
    line = assert_one_line_error(run_main("zebra", str(IMAGES / "horse.jpg"), "-o", str(folder), "--weights", str(checkpoint)))
    assert "is a directory" in line and loads == []
    fresh = tmp_path / "new" / "deeper" / "z.png"
    result = run_main("zebra", str(IMAGES / "horse.jpg"), "-o", str(fresh), "--weights", str(checkpoint), "--size", "64")
    assert result.returncode == 0, result.stderr
    assert fresh.is_file() and len(loads) == 1


def test_zebra_model_names_come_from_the_registry(tmp_path, run_main):
    # A style of the catalogue is a model the command knows (its weights are simply missing)…
    line = assert_one_line_error(run_main("zebra", str(IMAGES / "horse.jpg"), "-o", str(tmp_path / "z.png"),
                                          "--model", "style_vangogh"))
    assert "weights download style_vangogh" in line
    # …a classifier is not a zebra model, and the answer names the styles there are.
    line = assert_one_line_error(run_main("zebra", str(IMAGES / "horse.jpg"), "-o", str(tmp_path / "z.png"),
                                          "--model", "efficientnet_lite0"))
    assert "Unknown zebra model 'efficientnet_lite0'" in line and "style_monet" in line
