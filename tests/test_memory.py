"""`python -m inference memory` end to end (issue 14): the real service, the real EfficientNet-Lite0
and generated zebra and caption checkpoints in the published layouts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from inference import cli
from inference.memory import pss_bytes
from tests.conftest import IMAGES
from tests.runtime_fixtures import exported_cache  # noqa: F401 (a fixture)


def test_pss_is_read_from_proc() -> None:
    assert pss_bytes(os.getpid()) > 10 * 1024 * 1024  # a Python process with its imports
    with pytest.raises(Exception, match="Cannot read the memory"):
        pss_bytes(2**22 + 12345)  # above the kernel's largest pid: no such process


def test_memory_command_reports_every_process_loaded_and_after_a_burst(
    generated_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable, value in {"DEVICE": "cpu", "CPU_CORES": "1", "ZEBRA_SIZE": "64", "CAPTION_SIZE": "128"}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    shutil.copy(IMAGES / "bobby.jpg", tmp_path / "bobby.jpg")
    argv = ["memory", "--weights-dir", str(generated_weights_dir), "--runtime", "torch", "--burst", "2"]

    assert cli.main([*argv, "--images", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["runtime_setting"] == "torch" and report["cpu_cores"] == 1 and report["burst"] == 2
    assert [worker["task"] for worker in report["workers"]] == ["classify", "zebra", "caption"]
    for worker in report["workers"]:
        assert worker["runtime"] and worker["model"]
        assert 0 < worker["startup_s"] < 300
    assert report["burst_errors"] == {"classify": 0, "zebra": 0, "caption": 0}
    loaded, after = report["snapshots"]
    assert (loaded["label"], after["label"]) == ("models loaded", "after a burst")
    for snapshot in (loaded, after):
        roles = [process["role"] for process in snapshot["processes"]]
        assert roles == ["main", "classify", "zebra", "caption"]
        assert snapshot["total_mb"] == pytest.approx(sum(process["pss_mb"] for process in snapshot["processes"]))
        pids = [process["pid"] for process in snapshot["processes"]]
        assert pids[0] == os.getpid() and len(set(pids)) == 4  # a process each, the workers apart
        for process in snapshot["processes"]:
            assert process["pss_mb"] > 10
    # The same workers before and after (none crashed), each holding its model: the captioner's
    # ResNet-101 encoder alone is 170 MB of weights.
    assert [p["pid"] for p in loaded["processes"]] == [p["pid"] for p in after["processes"]]
    caption = next(process for process in loaded["processes"] if process["role"] == "caption")
    assert caption["pss_mb"] > 150


def test_memory_command_says_which_model_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("CPU_CORES", "1")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["memory", "--weights-dir", str(tmp_path / "empty"), "--images", str(IMAGES)]) == 1
    assert "zebra model did not load" in capsys.readouterr().err


def test_with_onnx_runtime_every_worker_stays_under_its_ceiling_at_the_largest_legal_image(
    exported_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = exported_cache.settings
    environment = {
        "DEVICE": "cpu", "CPU_CORES": "1", "ZEBRA_SIZE": str(settings.zebra_size),
        "CAPTION_SIZE": str(settings.caption_size), "MAX_BATCH_SIZE": str(settings.max_batch_size),
        "DECODE_MEMORY_MB": "32",  # the largest legal image: a 4:1 PNG of about 8 megapixels
    }
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.chdir(tmp_path)
    shutil.copy(IMAGES / "bobby.jpg", tmp_path / "bobby.jpg")
    argv = ["memory", "--weights-dir", str(settings.weights_dir), "--runtime", "onnx", "--burst", "2"]

    assert cli.main([*argv, "--images", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["burst_errors"] == {"classify": 0, "zebra": 0, "caption": 0}  # none killed or refused
    for worker in report["workers"]:
        assert worker["runtime"] == "onnx"
        # The need was measured and reported, the ceiling follows it (+ 32 MB to decode + headroom),
        # and the burst's peak stayed under it.
        assert worker["need_mb"] > 50, worker
        assert worker["need_mb"] + 32 < worker["ceiling_mb"] < worker["need_mb"] * 1.25 + 32 + 65, worker
        assert 0 < worker["peak_rss_mb"] < worker["ceiling_mb"], worker
