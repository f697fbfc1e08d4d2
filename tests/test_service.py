"""The inference worker queue: real worker processes, the real EfficientNet-Lite0, small images.

Spawning a worker costs seconds (a fresh interpreter imports torch and loads the model), so
most tests share one module-scoped service, and look at the *change* in its counters.
"""

from __future__ import annotations

import asyncio
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
from inference.batching import BatchPolicy, DynamicBatcher
from inference.errors import (
    Busy,
    InvalidImage,
    ModelUnavailable,
    RequestTimeout,
    ServiceClosed,
    WorkerCrashed,
)
from inference.pipeline import Prediction
from inference.service import InferenceService, TaskStats
from tests.conftest import IMAGES

pytestmark = pytest.mark.asyncio(loop_scope="module")


SHARED_SETTINGS = dict(
    device="cpu",
    torch_threads=1,  # the suite shares two cores with the test process and other runs
    max_batch_size=4,
    max_batch_wait_ms=20.0,
    max_queue_size=16,
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


def assert_dog(predictions: object) -> None:
    assert isinstance(predictions, list) and predictions
    assert all(isinstance(p, Prediction) for p in predictions)
    assert predictions[0].label == "golden retriever"


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def settle(awaitables: list[Awaitable[object]], timeout: float = 60.0) -> list[object]:
    """Every request's outcome (result or exception); fails if any is left hanging."""
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), timeout)


# --- the dynamic batcher on its own ------------------------------------------------------------------


class Item:
    def __init__(self, enqueued_at: float) -> None:
        self.enqueued_at = enqueued_at


async def test_batcher_takes_a_full_batch_without_waiting() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=3, max_wait_s=10.0), loop.time)
    items = [Item(loop.time()) for _ in range(5)]
    for item in items:
        batcher.put(item)
    assert [batcher.position(item) for item in items] == [0, 1, 2, 3, 4]
    started = loop.time()
    assert await batcher.next_batch() == items[:3]
    assert loop.time() - started < 1.0  # the 10 s window did not apply: the batch was full
    assert batcher.position(items[3]) == 0


async def test_batcher_waits_for_the_window_of_the_oldest_request() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=4, max_wait_s=0.1), loop.time)
    first = Item(loop.time())
    batcher.put(first)
    late = Item(0.0)

    async def arrive_later() -> None:
        await asyncio.sleep(0.03)
        late.enqueued_at = loop.time()
        batcher.put(late)

    arrival = asyncio.ensure_future(arrive_later())
    started = loop.time()
    batch = await batcher.next_batch()
    waited = loop.time() - started
    await arrival
    assert batch == [first, late]  # the one that came during the window joined the batch
    assert 0.09 <= waited < 0.5  # window counted from the oldest request, not the latest

    # A request that already waited longer than the window goes at once.
    old = Item(loop.time() - 1.0)
    batcher.put(old)
    started = loop.time()
    assert await batcher.next_batch() == [old]
    assert loop.time() - started < 0.05


async def test_batcher_remove_and_put_back() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=2, max_wait_s=0.0), loop.time)
    a, b, c = Item(0.0), Item(0.0), Item(0.0)
    for item in (a, b, c):
        batcher.put(item)
    assert batcher.remove(b) and not batcher.remove(b)
    assert await batcher.next_batch() == [a, c]
    batcher.put(b)
    batcher.put_back([a, c])
    assert [batcher.position(x) for x in (a, c, b)] == [0, 1, 2]


# --- the service ---------------------------------------------------------------------------------------


async def test_classify_through_a_worker_process(service: InferenceService, small_dog: bytes) -> None:
    before = classify_stats(service)
    predictions = await service.classify(small_dog, top=3)
    assert_dog(predictions)
    assert len(predictions) == 3
    assert predictions[0].probability > 50
    after = classify_stats(service)
    assert after.completed == before.completed + 1
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


async def test_overload_gets_busy_and_no_request_is_lost(service: InferenceService, small_dog: bytes) -> None:
    before = classify_stats(service)
    tickets, refusals = [], []
    for _ in range(40):  # all at once: nothing has left the queue yet
        try:
            tickets.append(service.submit("classify", small_dog))
        except Busy as busy:
            refusals.append(busy)
    assert len(tickets) == service.settings.max_queue_size
    assert len(refusals) == 40 - len(tickets)
    assert all(busy.retry_after >= 1.0 for busy in refusals)
    assert "busy" in str(refusals[0]).lower()

    results = await settle(tickets)
    for result in results:
        assert_dog(result)
    after = classify_stats(service)
    assert after.rejected - before.rejected == len(refusals)
    assert after.completed - before.completed == len(tickets)
    assert after.waiting == 0 and after.in_flight == 0


async def test_overload_from_many_clients_every_request_gets_an_answer(
    service: InferenceService, small_dog: bytes
) -> None:
    async def client() -> object:
        await asyncio.sleep(0)
        return await service.classify(small_dog)

    results = await settle([client() for _ in range(60)])
    answered = [r for r in results if isinstance(r, list)]
    busy = [r for r in results if isinstance(r, Busy)]
    assert len(answered) + len(busy) == 60, [r for r in results if not isinstance(r, (list, Busy))]
    assert answered and busy
    for result in answered:
        assert_dog(result)


async def test_per_user_cap(service: InferenceService, small_dog: bytes) -> None:
    cap = service.settings.max_pending_per_user
    mine = [service.submit("classify", small_dog, user="alice") for _ in range(cap)]
    with pytest.raises(Busy, match="in progress") as refused:
        service.submit("classify", small_dog, user="alice")
    assert refused.value.retry_after > 0
    assert service.pending_for("alice") == cap
    others = service.submit("classify", small_dog, user="bob")  # another user is not held up
    for result in await settle([*mine, others]):
        assert_dog(result)
    assert service.pending_for("alice") == 0
    assert_dog(await service.classify(small_dog, user="alice"))  # the cap frees up again


async def test_position_in_line(service: InferenceService, small_dog: bytes) -> None:
    tickets = [service.submit("classify", small_dog) for _ in range(6)]
    assert [ticket.position() for ticket in tickets] == [0, 1, 2, 3, 4, 5]
    await settle(tickets)
    assert [ticket.position() for ticket in tickets] == [0] * 6


async def test_request_timeout(service: InferenceService, small_dog: bytes) -> None:
    with pytest.raises(RequestTimeout, match="0.001 seconds"):
        await service.submit("classify", small_dog, user="carol", timeout=0.001)
    assert service.pending_for("carol") == 0
    timed_out = classify_stats(service).timed_out
    assert timed_out >= 1
    # The default timeout of the settings applies otherwise, and the service carries on.
    assert_dog(await service.classify(small_dog, user="carol"))
    await wait_until(lambda: classify_stats(service).in_flight == 0)


async def test_cancelled_requests_never_reach_the_model(service: InferenceService, small_dog: bytes) -> None:
    before = classify_stats(service)
    keep = [service.submit("classify", small_dog) for _ in range(4)]
    dropped = [service.submit("classify", small_dog) for _ in range(3)]
    for ticket in dropped:
        ticket.cancel()
    for result in await settle(keep):
        assert_dog(result)
    for ticket in dropped:
        with pytest.raises(asyncio.CancelledError):
            await ticket
    after = classify_stats(service)
    assert after.cancelled - before.cancelled == 3
    assert after.dispatched - before.dispatched == 4
    assert after.ran - before.ran == 4


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
    started = time.perf_counter()
    results = await settle([service.classify(phone_dog if i % 2 else small_dog) for i in range(16)])
    elapsed = time.perf_counter() - started
    stop.set()
    await ticking
    for result in results:
        assert_dog(result)
    assert elapsed > 0.2  # the models did run meanwhile
    assert len(lateness) > 10
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
    await wait_until(lambda: classify_stats(service).in_flight > 0)
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
    assert "horse2zebra" in zebra_state.detail

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


async def test_a_hung_worker_is_restarted(small_dog: bytes) -> None:
    """A model that never returns (a deadlock, a wedged GPU): requests time out, then the
    worker is killed and restarted, and the task works again."""
    async with InferenceService(Settings(**{**SHARED_SETTINGS, "request_timeout_s": 1.5})) as service:
        await service.warm_up("classify")
        before = classify_stats(service)
        os.kill(before.worker_pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                await service.classify(small_dog)
            await wait_until(lambda: classify_stats(service).worker_crashes == 1, timeout=10.0)
        finally:
            try:
                os.kill(before.worker_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert (await service.warm_up("classify"))[0].state == "ready"  # a fresh process
        assert_dog(await service.classify(small_dog))
        assert classify_stats(service).worker_pid not in (None, before.worker_pid)


async def test_the_service_knows_every_task_of_the_registry() -> None:
    from inference import registry, service

    assert service.TASKS == registry.TASKS


# --- closing ----------------------------------------------------------------------------------------------


async def test_close_answers_every_request_and_stops_the_workers(small_dog: bytes, phone_dog: bytes) -> None:
    service = InferenceService(Settings(**SHARED_SETTINGS))
    await service.start()
    await service.warm_up("classify")
    pid = service.stats()["classify"].worker_pid
    tickets = [service.submit("classify", phone_dog) for _ in range(12)]
    await wait_until(lambda: service.stats()["classify"].in_flight > 0)
    await asyncio.wait_for(service.close(grace_s=30.0), 60)
    results = await settle(tickets, timeout=1.0)
    finished = [r for r in results if isinstance(r, list)]
    closed = [r for r in results if isinstance(r, ServiceClosed)]
    assert len(finished) + len(closed) == 12, results
    assert finished and closed  # the running ones finished, the waiting ones were told
    with pytest.raises(ServiceClosed):
        service.submit("classify", small_dog)
    await service.close()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


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
