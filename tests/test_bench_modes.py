"""`python -m inference bench --runtime | --compare-runtime | --mix` (issue 9): small real runs
through the command, the real EfficientNet-Lite0 and generated zebra and caption checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from config import Settings
from inference import bench
from inference.bench_modes import MixReport, RuntimeComparison, RuntimeRun
from tests.conftest import IMAGES

SMALL = dict(device="cpu", cpu_cores=1, max_batch_size=4, max_batch_wait_ms=10.0, zebra_size=64, caption_size=128)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small photo: the bench adds a phone-size version of it."""
    folder = tmp_path_factory.mktemp("photos")
    with Image.open(IMAGES / "bobby.jpg") as image:
        image.convert("RGB").resize((320, 240)).save(folder / "bobby.jpg", quality=90)
    return folder


def run_command(argv: list[str], settings: Settings, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv, "--json"])
    assert args.handler(args, settings) == 0
    return json.loads(capsys.readouterr().out)


def figures(throughput: float, p99_ms: float) -> bench.RunFigures:
    return bench.RunFigures(
        requests=8, errors=0, seconds=1.0, throughput=throughput, p50_ms=p99_ms / 2, p95_ms=p99_ms, p99_ms=p99_ms,
        max_loop_lag_ms=1.0,
    )


def test_runtime_flag_sets_the_setting_and_the_report_names_what_ran(
    photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--requests", "4", "--concurrency", "2", "--images", str(photos), "--runtime", "torch"]
    report = run_command(argv, Settings(inference_runtime="auto", **SMALL), capsys)
    assert report["runtime"] == "torch"
    assert report["service"]["errors"] == 0


def test_compare_runtime_runs_the_same_load_with_each_runtime(photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--requests", "4", "--concurrency", "2", "--images", str(photos), "--compare-runtime"]
    report = run_command(argv, Settings(**SMALL), capsys)
    assert report["task"] == "classify"
    assert [run["setting"] for run in report["runs"]] == ["auto", "torch"]  # INFERENCE_RUNTIME's default, then torch
    for run in report["runs"]:
        assert run["reported"] in ("torch", "onnx", "onnxruntime")
        assert run["figures"]["requests"] == 4 and run["figures"]["errors"] == 0
    throughputs = [run["figures"]["throughput"] for run in report["runs"]]
    assert report["ratio"] == pytest.approx(throughputs[0] / throughputs[1])
    assert set(report["targets"]) == {"no errors", "throughput >= 1.4 x torch"}


def test_mix_measures_classify_alone_and_beside_queued_heavy_requests(
    photos: Path, generated_weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--requests", "8", "--concurrency", "2", "--images", str(photos), "--mix"]
    report = run_command(argv, Settings(weights_dir=generated_weights_dir, **SMALL), capsys)
    assert report["cpu_cores"] == 1 and set(report["runtimes"]) == {"classify", "zebra", "caption"}
    for run in (report["alone"], report["mixed"]):
        assert run["requests"] == 8 and run["errors"] == 0
        assert 0 < run["p50_ms"] <= run["p99_ms"]
    assert report["p99_ratio"] == pytest.approx(report["mixed"]["p99_ms"] / report["alone"]["p99_ms"])
    # The heavy requests really ran while classify's load was measured.
    assert sum(report["heavy_answered"].values()) >= 1
    assert "classify p99 beside zebra + caption <= 3 x alone" in report["targets"]


def test_mix_without_the_heavy_weights_names_what_is_missing(photos: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--mix", "--images", str(photos), "--weights-dir", str(tmp_path)])
    with pytest.raises(Exception, match="needs all three models.*zebra"):
        args.handler(args, Settings(**SMALL))


def test_text_reports_name_the_ratios_and_targets() -> None:
    comparison = RuntimeComparison(
        task="caption", requests=16, concurrency=4,
        runs=[RuntimeRun("auto", "onnxruntime", figures(3.0, 900.0)), RuntimeRun("torch", "torch", figures(2.0, 1200.0))],
        ratio=1.5, targets={"throughput >= 1.2 x torch": True},
    )
    text = comparison.format()
    for expected in ("onnxruntime", "3.00", "2.00", "auto / torch throughput: 1.50×", "throughput >= 1.2 x torch: ok"):
        assert expected in text
    mix = MixReport(
        requests=64, concurrency=16, cpu_cores=2, runtimes={"classify": "torch", "zebra": "torch", "caption": "torch"},
        alone=figures(100.0, 50.0), mixed=figures(40.0, 200.0), p99_ratio=4.0, heavy_answered={"zebra": 3, "caption": 2},
        targets={"classify p99 beside zebra + caption <= 3 x alone": False},
    )
    text = mix.format()
    for expected in ("50.0", "200.0", "4.00×", "zebra 3, caption 2", "<= 3 x alone: MISSED", "2 cores shared"):
        assert expected in text


def test_the_bench_report_prints_the_runtime() -> None:
    report = bench.BenchReport(
        task="classify", requests=8, concurrency=2, inputs=["a.jpg"], cpu_cores=2, max_batch_size=8,
        max_batch_wait_ms=5.0, service=figures(10.0, 100.0), baseline=figures(5.0, 50.0), speedup=2.0,
        p99_limit_ms=400.0, batch_sizes={2: 4}, targets={}, runtime="onnxruntime",
    )
    assert "2 cores" in bench.format_report(report) and "runtime onnxruntime" in bench.format_report(report)
