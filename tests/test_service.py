"""The local backend's own ways: real worker processes, the real EfficientNet-Lite0, small images.

What every backend promises (submit, position, cancel, Busy, reservations, timeouts, options,
model states, closing) is in `test_backend_contract.py`; here is what only worker processes do:
batches, crashes and restarts, hangs, the pipe, the event loop kept free of big copies.

Spawning a worker costs seconds (a fresh interpreter imports torch and loads the model), so
most tests share one module-scoped service, and look at the *change* in its counters.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from config import Settings
from inference.errors import (
    InferenceError,
    InvalidImage,
    ModelUnavailable,
    RequestTimeout,
    ServiceClosed,
    WorkerCrashed,
)
from inference.service import STALL_GRACE_S, InferenceService, TaskStats
from tests.conftest import IMAGES, assert_dog

pytestmark = pytest.mark.asyncio(loop_scope="module")


SHARED_SETTINGS = dict(
    device="cpu",
    cpu_cores=1,  # the suite shares two cores with the test process and other runs
    max_batch_size=4,
    max_batch_wait_ms=20.0,
    classify_queue_size=16,
    max_pending_per_user=2,
    request_timeout_s=60.0,
)


def jpeg(path: Path, size: tuple[int, int]) -> bytes:
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize(size).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


@pytest.fixture(scope="module")
def small_dog() -> bytes:
    return jpeg(IMAGES / "bobby.jpg", (320, 180))


@pytest.fixture(scope="module")
def phone_dog() -> bytes:
    """A phone-camera-size photo: decoding it is real work."""
    return jpeg(IMAGES / "bobby.jpg", (4000, 3000))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty at first: the zebra and caption weights are missing until a test writes them."""
    return tmp_path_factory.mktemp("service-weights")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(weights_dir: Path) -> AsyncIterator[InferenceService]:
    async with InferenceService(Settings(weights_dir=weights_dir, **SHARED_SETTINGS)) as service:
        states = await service.warm_up("classify")
        assert states[0].state == "ready", states
        yield service


def classify_stats(service: InferenceService) -> TaskStats:
    return service.stats()["classify"]


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def settle(awaitables: list[Awaitable[object]], timeout: float = 60.0) -> list[object]:
    """Every request's outcome (result or exception); fails if any is left hanging."""
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), timeout)


# --- the service ---------------------------------------------------------------------------------------


async def test_classify_through_a_worker_process(service: InferenceService, small_dog: bytes) -> None:
    before = classify_stats(service)
    predictions = await service.classify(small_dog, top=3)
    assert_dog(predictions)
    assert len(predictions) == 3
    assert predictions[0].probability > 50
    after = classify_stats(service)
    assert after.done == before.done + 1
    assert after.worker_pid is not None and after.worker_pid != os.getpid()
    states = {state.task: state for state in service.models()}
    assert states["classify"].state == "ready" and states["classify"].model == "efficientnet_lite0"
    assert states["zebra"].state == "idle"  # never asked for: no process, nothing loaded


async def test_concurrent_requests_run_in_batches(service: InferenceService, small_dog: bytes) -> None:
    before = classify_stats(service)
    results = await settle([service.classify(small_dog) for _ in range(12)])
    for result in results:
        assert_dog(result)
    after = classify_stats(service)
    assert after.ran - before.ran == 12
    new_batches = {size: after.batch_sizes.get(size, 0) - before.batch_sizes.get(size, 0) for size in after.batch_sizes}
    assert sum(size * count for size, count in new_batches.items()) == 12
    assert any(size > 1 and count > 0 for size, count in new_batches.items()), new_batches
    assert max(size for size, count in new_batches.items() if count) <= 4  # max_batch_size


async def test_one_bad_image_fails_only_its_own_request(service: InferenceService, small_dog: bytes) -> None:
    results = await settle(
        [service.classify(small_dog), service.classify(b"this is not an image"), service.classify(small_dog[:200])]
        + [service.classify(small_dog)]
    )
    assert_dog(results[0])
    assert isinstance(results[1], InvalidImage)
    assert isinstance(results[2], InvalidImage)
    assert_dog(results[3])


async def test_an_oversized_upload_is_refused_before_the_worker(service: InferenceService) -> None:
    before = classify_stats(service)
    too_big = b"\xff\xd8" + bytes(service.settings.max_image_bytes)
    with pytest.raises(InvalidImage, match="too large"):
        await service.classify(too_big)
    assert classify_stats(service).dispatched == before.dispatched


async def test_a_caller_that_goes_away_is_dropped_from_the_line(
    service: InferenceService, small_dog: bytes, phone_dog: bytes
) -> None:
    before = classify_stats(service)
    # Fill the worker's two batch slots and the line ahead of the caller.
    blockers = [service.submit("classify", phone_dog) for _ in range(12)]
    caller = asyncio.ensure_future(service.classify(small_dog))
    await asyncio.sleep(0)
    assert classify_stats(service).waiting >= 1
    caller.cancel()  # e.g. the chat command that asked for it timed out
    with pytest.raises(asyncio.CancelledError):
        await caller
    for result in await settle(blockers):
        assert_dog(result)
    after = classify_stats(service)
    assert after.cancelled - before.cancelled == 1
    assert after.ran - before.ran == 12
    assert after.dispatched - before.dispatched == 12


async def test_a_request_cancelled_inside_the_worker_never_reaches_the_model(
    service: InferenceService, phone_dog: bytes
) -> None:
    before = classify_stats(service)
    first = [service.submit("classify", phone_dog) for _ in range(4)]  # a full batch: on the model
    second = [service.submit("classify", phone_dog) for _ in range(4)]  # the next one, held by the worker
    await wait_until(
        lambda: classify_stats(service).dispatched - before.dispatched == 8 and classify_stats(service).running == 4
    )
    assert [ticket.position() for ticket in second] == [0, 1, 2, 3]  # in the worker, not started
    second[1].cancel()  # the worker has it: only a `Cancel` message can spare the model
    for result in await settle([*first, second[0], *second[2:]]):
        assert_dog(result)
    # The batch's last message (after the results) says how many the worker skipped.
    await wait_until(lambda: classify_stats(service).skipped_in_worker - before.skipped_in_worker == 1, timeout=5)
    after = classify_stats(service)
    assert after.ran - before.ran == 7
    assert after.cancelled - before.cancelled == 1


async def test_the_event_loop_stays_responsive_while_models_run(
    service: InferenceService, phone_dog: bytes, small_dog: bytes
) -> None:
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lateness.append(time.perf_counter() - before - 0.005)

    ticking = asyncio.ensure_future(ticker())
    results = await settle([service.classify(phone_dog if i % 2 else small_dog) for i in range(16)])
    stop.set()
    await ticking
    for result in results:
        assert_dog(result)
    assert len(lateness) > 20  # the loop ticked all along while the models ran (≥ 0.1 s)
    assert max(lateness) < 0.05, f"the event loop stalled for {max(lateness) * 1000:.0f} ms"


async def test_large_uploads_do_not_stall_the_event_loop(service: InferenceService) -> None:
    from inference.bench import LoopLagMonitor

    uploads = [b"\xff\xd8\xff" + os.urandom(20 * 1024 * 1024) for _ in range(6)]  # 120 MB in all
    async with LoopLagMonitor(tick_s=0.002) as monitor:
        results = await settle([service.classify(upload) for upload in uploads])
    assert all(isinstance(result, InvalidImage) for result in results), results
    assert monitor.max_lag_s < 0.05, f"the event loop stalled for {monitor.max_lag_s * 1000:.0f} ms"


async def test_a_killed_worker_fails_its_requests_and_comes_back(
    service: InferenceService, phone_dog: bytes, small_dog: bytes
) -> None:
    before = classify_stats(service)
    tickets = [service.submit("classify", phone_dog) for _ in range(8)]
    await wait_until(lambda: classify_stats(service).running > 0)
    os.kill(before.worker_pid, signal.SIGKILL)  # the out-of-memory killer, a segfault…
    results = await settle(tickets)
    crashed = [r for r in results if isinstance(r, WorkerCrashed)]
    assert crashed, results
    assert all(isinstance(r, WorkerCrashed) or isinstance(r, list) for r in results), results
    assert "crashed" in str(crashed[0])
    after = classify_stats(service)
    assert after.worker_crashes == before.worker_crashes + 1
    state = {s.task: s for s in service.models()}["classify"]
    assert state.state in ("idle", "loading", "ready")

    # The next request starts a fresh worker and succeeds.
    assert_dog(await service.classify(small_dog))
    restarted = classify_stats(service)
    assert restarted.worker_pid not in (None, before.worker_pid)
    assert restarted.worker_starts == before.worker_starts + 1
    assert {s.task: s for s in service.models()}["classify"].state == "ready"


async def test_missing_weights_fail_their_own_requests_only(
    service: InferenceService, small_dog: bytes, weights_dir: Path
) -> None:
    zebra = service.submit("zebra", small_dog)
    dog = service.submit("classify", small_dog)
    with pytest.raises(ModelUnavailable) as missing:
        await zebra
    assert "horse2zebra" in str(missing.value)
    assert_dog(await dog)  # the classifier is another process, unaffected
    zebra_state = {s.task: s for s in service.models()}["zebra"]
    assert zebra_state.state == "unavailable"
    assert "horse2zebra" in zebra_state.error

    # Not remembered forever: once the weights are there, the next request loads them.
    from tests.checkpoints import write_cyclegan_checkpoint

    write_cyclegan_checkpoint(weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth")
    png = await service.zebra(small_dog)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        assert image.width > image.height  # the landscape photo stays landscape
    assert {s.task: s for s in service.models()}["zebra"].state == "ready"
    assert service.stats()["zebra"].worker_crashes == 0


async def test_caption_through_the_service(
    service: InferenceService, small_dog: bytes, weights_dir: Path, generated_weights_dir: Path
) -> None:
    (weights_dir / "captioner").symlink_to(generated_weights_dir / "captioner", target_is_directory=True)
    text = await service.caption(small_dog, beam=1)
    assert isinstance(text, str)  # generated weights: the words are random, the type is not
    assert {s.task: s for s in service.models()}["caption"].state == "ready"


async def test_an_unsendable_option_fails_alone_and_the_next_request_is_answered(
    service: InferenceService, small_dog: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.tasks import TaskSpec

    # Past the validation, as a bug or a new option type would be: a function cannot be pickled.
    monkeypatch.setattr(TaskSpec, "validate", lambda self, options, settings: dict(options))
    crashes = classify_stats(service).worker_crashes
    started = time.monotonic()
    with pytest.raises(InferenceError, match="could not be sent"):
        await asyncio.wait_for(service.submit("classify", small_dog, top=lambda: 5), 10)
    monkeypatch.undo()
    assert_dog(await asyncio.wait_for(service.classify(small_dog), 20))
    assert time.monotonic() - started < 20  # not the two minutes of the stall check
    assert classify_stats(service).worker_crashes == crashes  # the same worker, its writer alive


async def test_refused_timed_out_cancelled_or_dropped_tickets_leave_nothing_in_the_log(
    service: InferenceService, small_dog: bytes
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        service.submit("classify", b"\xff\xd8" + bytes(service.settings.max_image_bytes))  # refused
        service.submit("classify", small_dog, timeout=0.001)  # times out, never awaited
        timed_out = service.submit("classify", small_dog, timeout=0.001)
        service.submit("classify", small_dog).cancel()
        await wait_until(timed_out.done)
        del timed_out
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.05)
        await wait_until(lambda: classify_stats(service).running == 0 and classify_stats(service).waiting == 0)
    finally:
        loop.set_exception_handler(previous)
    assert not reported, reported


async def test_a_hung_worker_is_restarted(small_dog: bytes) -> None:
    """A model that never returns (a deadlock, a wedged GPU): requests time out, then the
    worker is killed and restarted, and the task works again.  The hang is judged by the
    batch's own deadline (1.5 s here), not by the service's default timeout (60 s)."""
    async with InferenceService(Settings(**SHARED_SETTINGS)) as service:
        await service.warm_up("classify")
        before = classify_stats(service)
        os.kill(before.worker_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RequestTimeout):
                await service.submit("classify", small_dog, timeout=1.5)
            await wait_until(lambda: classify_stats(service).worker_crashes == 1, timeout=10.0)
            assert time.monotonic() - started < 1.5 + STALL_GRACE_S + 3.0
            assert "stopped responding" in {s.task: s for s in service.models()}["classify"].error
        finally:
            try:
                os.kill(before.worker_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert (await service.warm_up("classify"))[0].state == "ready"  # a fresh process
        assert_dog(await service.classify(small_dog))
        assert classify_stats(service).worker_pid not in (None, before.worker_pid)


async def test_every_task_has_a_default_model_and_one_list_of_names() -> None:
    from inference import registry, service, tasks

    for task in tasks.TASKS:  # what a worker will be asked to load is known to the registry
        assert registry.get_model(tasks.get_task(task).default_model(Settings()), task).name
    assert service.TASKS is tasks.TASKS and registry.TASKS is tasks.TASKS


# --- closing ----------------------------------------------------------------------------------------------


async def test_close_stops_the_worker_processes(small_dog: bytes) -> None:
    service = InferenceService(Settings(**SHARED_SETTINGS))
    await service.start()
    await service.warm_up("classify")
    pid = service.stats()["classify"].worker_pid
    assert pid is not None and {s.task: s for s in service.models()}["classify"].worker_pid == pid
    assert_dog(await service.classify(small_dog))
    await asyncio.wait_for(service.close(grace_s=30.0), 60)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert service.stats()["classify"].worker_pid is None


async def test_close_without_grace_fails_running_requests_and_never_hangs(phone_dog: bytes) -> None:
    service = InferenceService(Settings(**SHARED_SETTINGS))
    await service.start()
    tickets = [service.submit("classify", phone_dog) for _ in range(6)]  # the worker is still starting
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await asyncio.wait_for(service.close(grace_s=0.0), 30)
    assert time.perf_counter() - started < 15
    for result in await settle(tickets, timeout=1.0):
        assert isinstance(result, ServiceClosed), result
