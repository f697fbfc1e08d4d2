"""`python -m inference bench`: its inputs, its measuring tools, and one small real run."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from config import Settings
from inference import bench
from tests.conftest import IMAGES



def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert bench.percentile(values, 0.50) == 50
    assert bench.percentile(values, 0.95) == 95
    assert bench.percentile(values, 0.99) == 99
    assert bench.percentile([7.0], 0.99) == 7.0


def test_inputs_are_the_photos_and_phone_size_versions(tmp_path: Path) -> None:
    shutil.copy(IMAGES / "horse.jpg", tmp_path / "horse.jpg")
    (tmp_path / "notes.txt").write_text("not a photo")
    inputs = bench.bench_inputs(tmp_path)
    assert [item.name for item in inputs] == ["horse.jpg", "horse-4000x3000.jpg"]
    assert inputs[0].data == (IMAGES / "horse.jpg").read_bytes()
    with Image.open(io.BytesIO(inputs[1].data)) as phone:
        assert phone.format == "JPEG" and phone.size == (4000, 3000) == inputs[1].size
    assert len(inputs[1].data) > len(inputs[0].data)


def test_no_photos_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="No JPEG photos"):
        bench.bench_inputs(tmp_path)


@pytest.mark.asyncio
async def test_loop_lag_monitor_sees_a_blocked_loop() -> None:
    async with bench.LoopLagMonitor() as idle:
        await asyncio.sleep(0.05)
    async with bench.LoopLagMonitor() as blocked:
        await asyncio.sleep(0.02)
        time.sleep(0.12)  # what model work on the event loop does
        await asyncio.sleep(0.02)
    assert blocked.max_lag_s >= 0.1
    assert idle.max_lag_s < blocked.max_lag_s


def test_bench_command_measures_service_and_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(IMAGES / "bobby.jpg", tmp_path / "bobby.jpg")
    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--requests", "8", "--concurrency", "4", "--images", str(tmp_path), "--json"])
    # A queue shorter than the clients: the bench makes room (it measures draining, not refusing).
    settings = Settings(device="cpu", cpu_cores=1, max_batch_size=4, max_batch_wait_ms=10.0, classify_queue_size=2)

    assert args.handler(args, settings) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["task"] == "classify" and report["requests"] == 8 and report["concurrency"] == 4
    for run in (report["service"], report["baseline"]):
        assert run["requests"] == 8 and run["errors"] == 0
        assert run["throughput"] > 0
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    assert report["speedup"] == pytest.approx(report["service"]["throughput"] / report["baseline"]["throughput"])
    assert report["p99_limit_ms"] == pytest.approx(2 * 4 / report["service"]["throughput"] * 1000)
    # The naive baseline decodes a 12-megapixel JPEG and runs the model right on the loop.
    assert report["baseline"]["max_loop_lag_ms"] > 5
    sizes = {int(size): count for size, count in report["batch_sizes"].items()}
    assert sum(size * count for size, count in sizes.items()) >= 8 and max(sizes) <= 4
    assert set(report["targets"]) >= {"throughput >= 1.1 x baseline", "max loop lag <= 50 ms"}


def test_text_report_names_every_figure() -> None:
    run = bench.RunFigures(
        requests=64, errors=0, seconds=1.0, throughput=64.0, p50_ms=200.0, p95_ms=300.0, p99_ms=310.0, max_loop_lag_ms=4.0
    )
    base = bench.RunFigures(
        requests=64, errors=0, seconds=1.6, throughput=40.0, p50_ms=25.0, p95_ms=30.0, p99_ms=35.0, max_loop_lag_ms=90.0
    )
    report = bench.BenchReport(
        task="classify", requests=64, concurrency=16, inputs=["a.jpg"], cpu_cores=2, max_batch_size=8,
        max_batch_wait_ms=5.0, service=run, baseline=base, speedup=1.6, p99_limit_ms=500.0, batch_sizes={8: 8},
        targets={"max loop lag <= 50 ms": True, "throughput >= 1.1 x baseline": False},
    )
    text = bench.format_report(report)
    for expected in ("64.00", "40.00", "1.60×", "310.0", "90.0", "{8: 8}", "500 ms"):
        assert expected in text
    assert "max loop lag <= 50 ms: ok" in text and "throughput >= 1.1 x baseline: MISSED" in text
    assert json.loads(report.to_json())["service"]["p99_ms"] == 310.0
