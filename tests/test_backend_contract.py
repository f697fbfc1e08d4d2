"""The contract every inference backend keeps (`inference.service.api.InferenceBackend`).

One suite, run against each backend through the parametrized `backend_factory` fixture: today
"local" (worker processes); issue 10 adds "ray" as one more entry of `BACKENDS`.  Only what the
Protocol promises is asserted here; what one backend does its own way (worker processes, their
memory, their pipes) is tested beside its modules (`test_service.py`, `test_supervisor.py`…).

Starting a backend costs seconds (a model loads), so most tests share one per module and look at
the *change* in its counters.
"""

from __future__ import annotations

import asyncio
import gc
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from config import Settings
from inference.errors import Busy, ModelUnavailable, RequestTimeout, ServiceClosed
from inference.service import InferenceBackend, InferenceService, Reservation, TaskStats, Ticket
from inference.service.ray_backend import RayBackend
from tests.conftest import IMAGES, assert_dog

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Backend name → how to build one from settings.
BACKENDS: dict[str, Callable[[Settings], InferenceBackend]] = {
    "local": InferenceService,
    # Starts a local Ray instance (the first one built owns it and stops it on close) and
    # deploys the Serve application `vision` on it.
    "ray": RayBackend,
}

SETTINGS = dict(
    device="cpu",
    cpu_cores=1,  # the suite shares two cores with the test process and other runs
    # Named, not `auto` (which picks by a timing taken at export, on a machine shared with other
    # runs): the model states below say which runtime runs each model.
    inference_runtime="onnx",
    max_batch_size=4,
    max_batch_wait_ms=20.0,
    classify_queue_size=16,
    zebra_queue_size=4,
    max_pending_per_user=2,
    request_timeout_s=60.0,
)


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend_factory(request: pytest.FixtureRequest) -> Callable[[Settings], InferenceBackend]:
    return BACKENDS[request.param]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty: the zebra and caption weights are missing."""
    return tmp_path_factory.mktemp("contract-weights")


@pytest.fixture(scope="module")
def dog() -> bytes:
    with Image.open(IMAGES / "bobby.jpg") as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize((320, 180)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


@pytest.fixture(scope="module")
def phone_dog() -> bytes:
    """A phone-camera-size photo: decoding it takes a while."""
    with Image.open(IMAGES / "bobby.jpg") as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize((4000, 3000)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(
    backend_factory: Callable[[Settings], InferenceBackend], weights_dir: Path
) -> AsyncIterator[InferenceBackend]:
    async with backend_factory(Settings(weights_dir=weights_dir, **SETTINGS)) as backend:
        states = await backend.warm_up("classify")
        assert [state.state for state in states] == ["ready"], states
        yield backend


def classify(backend: InferenceBackend) -> TaskStats:
    return backend.stats()["classify"]


async def settle(awaitables: list[Awaitable[object]], timeout: float = 60.0) -> list[object]:
    """Every request's outcome (result or exception); fails if any is left hanging."""
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), timeout)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


# --- the interface ---------------------------------------------------------------------------------


async def test_it_is_an_inference_backend_and_hands_out_tickets_and_reservations(
    backend: InferenceBackend, dog: bytes
) -> None:
    assert isinstance(backend, InferenceBackend)
    ticket = backend.submit("classify", dog)
    assert isinstance(ticket, Ticket) and ticket.task == "classify"
    with backend.reserve("classify", 1) as slots:
        assert isinstance(slots, Reservation) and slots.task == "classify"
    assert_dog(await ticket)
    assert ticket.done()


async def test_submit_and_await_a_result_and_count_it(backend: InferenceBackend, dog: bytes) -> None:
    before = classify(backend)
    predictions = await backend.submit("classify", dog, top=3)
    assert_dog(predictions)
    assert len(predictions) == 3
    after = classify(backend)
    assert (after.submitted, after.done, after.ran) == (before.submitted + 1, before.done + 1, before.ran + 1)
    assert after.failed == before.failed and after.waiting == 0 and after.running == 0
    assert 0 < after.p50_ms <= after.p95_ms


async def test_latency_percentiles_come_from_the_recent_requests(backend: InferenceBackend, dog: bytes) -> None:
    # A batch of requests that waits behind each other: the slowest ones set p95, not p50.
    results = await settle([backend.submit("classify", dog) for _ in range(10)])
    for result in results:
        assert_dog(result)
    stats = classify(backend)
    assert stats.p50_ms < stats.p95_ms
    assert stats.p95_ms < 60_000  # milliseconds, not seconds or nanoseconds


async def test_position_counts_down_to_zero(backend: InferenceBackend, dog: bytes) -> None:
    tickets = [backend.submit("classify", dog) for _ in range(6)]
    assert [ticket.position() for ticket in tickets] == [0, 1, 2, 3, 4, 5]
    last = tickets[-1]
    seen = [last.position()]
    for ticket in tickets[:-1]:
        await ticket
        seen.append(last.position())
    await last
    seen.append(last.position())
    assert seen[0] == 5 and seen[-1] == 0
    assert all(later <= earlier for earlier, later in zip(seen, seen[1:])), seen


async def test_a_ticket_estimates_its_wait_from_the_measured_speed(backend: InferenceBackend, dog: bytes) -> None:
    await backend.submit("classify", dog)  # the task has measured at least one request now
    tickets = [backend.submit("classify", dog) for _ in range(4)]
    estimates = [ticket.estimated_wait() for ticket in tickets]
    assert all(estimate is not None and estimate > 0 for estimate in estimates), estimates
    assert estimates == sorted(estimates) and estimates[-1] > estimates[0]  # more ahead, longer
    await settle(tickets)
    assert [ticket.estimated_wait() for ticket in tickets] == [0.0] * 4


async def test_cancelled_before_it_starts_never_reaches_the_model(backend: InferenceBackend, dog: bytes) -> None:
    before = classify(backend)
    keep = [backend.submit("classify", dog) for _ in range(4)]
    dropped = [backend.submit("classify", dog) for _ in range(3)]
    for ticket in dropped:
        ticket.cancel()
    for result in await settle(keep):
        assert_dog(result)
    for ticket in dropped:
        with pytest.raises(asyncio.CancelledError):
            await ticket
    after = classify(backend)
    assert after.cancelled - before.cancelled == 3
    assert after.ran - before.ran == 4
    assert after.done - before.done == 4


async def test_a_ticket_dropped_unawaited_cancels_its_request(backend: InferenceBackend, dog: bytes) -> None:
    before = classify(backend)
    dropped = backend.submit("classify", dog, user="walked-away")
    kept = backend.submit("classify", dog)
    del dropped  # the caller went away without awaiting it
    gc.collect()
    assert_dog(await kept)
    await wait_until(lambda: backend.pending_for("walked-away") == 0)
    after = classify(backend)
    assert after.cancelled - before.cancelled == 1
    assert after.ran - before.ran == 1


async def test_a_full_queue_answers_busy_with_a_retry_hint(backend: InferenceBackend, dog: bytes) -> None:
    before = classify(backend)
    limit = SETTINGS["classify_queue_size"]
    tickets, refusals = [], []
    for _ in range(limit + 5):  # all at once: nothing has left the queue yet
        try:
            tickets.append(backend.submit("classify", dog))
        except Busy as busy:
            refusals.append(busy)
    assert (len(tickets), len(refusals)) == (limit, 5)
    assert all(0 < busy.retry_after < float("inf") for busy in refusals)
    assert "busy" in str(refusals[0]).lower()
    for result in await settle(tickets):
        assert_dog(result)
    after = classify(backend)
    assert after.rejected - before.rejected == 5
    assert after.done - before.done == limit


async def test_a_crowd_of_clients_each_gets_an_answer_or_busy(backend: InferenceBackend, dog: bytes) -> None:
    async def client() -> object:
        await asyncio.sleep(0)
        return await backend.submit("classify", dog)

    results = await settle([client() for _ in range(60)])
    answered = [r for r in results if isinstance(r, list)]
    busy = [r for r in results if isinstance(r, Busy)]
    assert len(answered) + len(busy) == 60, [r for r in results if not isinstance(r, (list, Busy))]
    assert answered and busy
    for result in answered:
        assert_dog(result)


async def test_a_full_queue_of_one_task_leaves_the_others_answering(backend: InferenceBackend, dog: bytes) -> None:
    async with backend.reserve("zebra", 100) as backlog:
        assert backlog.granted == SETTINGS["zebra_queue_size"]
        with pytest.raises(Busy, match="zebra"):
            backend.submit("zebra", dog)
        assert_dog(await backend.submit("classify", dog))


async def test_one_user_gets_at_most_their_share(backend: InferenceBackend, dog: bytes) -> None:
    cap = SETTINGS["max_pending_per_user"]
    mine = [backend.submit("classify", dog, user="alice") for _ in range(cap)]
    with pytest.raises(Busy, match="in progress") as refused:
        backend.submit("classify", dog, user="alice")
    assert refused.value.retry_after > 0
    assert backend.pending_for("alice") == cap
    others = backend.submit("classify", dog, user="bob")  # another user is not held up
    for result in await settle([*mine, others]):
        assert_dog(result)
    assert backend.pending_for("alice") == 0
    assert_dog(await backend.submit("classify", dog, user="alice"))  # the share frees up again


async def test_a_reservation_holds_slots_until_used_or_released(backend: InferenceBackend, dog: bytes) -> None:
    cap = SETTINGS["max_pending_per_user"]
    slots = backend.reserve("classify", cap + 3, user="dave")
    assert slots.granted == cap and slots.remaining == cap
    # Why the other three were not granted: the Busy they would have got, hint included.
    assert isinstance(slots.shortfall, Busy) and f"You already have {cap} requests in progress" in str(slots.shortfall)
    assert 0 < slots.shortfall.retry_after < float("inf")
    assert backend.pending_for("dave") == cap and classify(backend).reserved == cap
    with pytest.raises(Busy, match="in progress"):
        backend.reserve("classify", 1, user="dave")
    ticket = slots.submit(dog, top=2)
    assert slots.remaining == cap - 1 and classify(backend).reserved == cap - 1
    slots.release()
    slots.release()  # idempotent
    with pytest.raises(RuntimeError):
        slots.submit(dog)
    assert backend.pending_for("dave") == 1  # the request it submitted
    assert len(await ticket) == 2
    assert backend.pending_for("dave") == 0

    # The queue limit counts reserved slots: a full reservation makes the task busy.
    limit = SETTINGS["classify_queue_size"]
    async with backend.reserve("classify", limit + 5) as everything:
        assert everything.granted == limit
        assert everything.shortfall is not None and "classify model is busy" in str(everything.shortfall)
        with pytest.raises(Busy, match="busy"):
            backend.submit("classify", dog)
    assert classify(backend).reserved == 0
    with pytest.raises(ValueError):
        backend.reserve("classify", 0)
    with backend.reserve("classify", 1) as one:
        assert one.shortfall is None  # all granted


async def test_a_dropped_reservation_gives_its_slots_back(backend: InferenceBackend) -> None:
    backend.reserve("classify", 2, user="frank")
    gc.collect()
    await wait_until(lambda: backend.pending_for("frank") == 0, timeout=2.0)
    assert classify(backend).reserved == 0


async def test_a_request_past_its_deadline_times_out(backend: InferenceBackend, dog: bytes) -> None:
    before = classify(backend)
    with pytest.raises(RequestTimeout, match="0.001 seconds"):
        await backend.submit("classify", dog, user="carol", timeout=0.001)
    assert backend.pending_for("carol") == 0
    assert classify(backend).timed_out == before.timed_out + 1
    assert_dog(await backend.submit("classify", dog, user="carol"))  # and the backend carries on
    await wait_until(lambda: classify(backend).running == 0)


@pytest.mark.parametrize(
    "task, options, error",
    [
        ("classify", {"top": 0}, ValueError),
        ("classify", {"top": 21}, ValueError),
        ("classify", {"top": "5"}, TypeError),
        ("classify", {"top": True}, TypeError),
        ("classify", {"beam": 2}, TypeError),
        ("zebra", {"top": 3}, TypeError),
        ("caption", {"beam": 11}, ValueError),
        ("caption", {"beam": 2.5}, TypeError),
    ],
)
async def test_options_are_checked_before_anything_is_queued(
    backend: InferenceBackend, dog: bytes, task: str, options: dict[str, object], error: type[Exception]
) -> None:
    before = backend.stats()[task]
    with pytest.raises(error, match=next(iter(options))):
        backend.submit(task, dog, user="erin", **options)
    after = backend.stats()[task]
    assert (after.submitted, after.rejected, after.reserved) == (before.submitted, before.rejected, 0)
    assert backend.pending_for("erin") == 0
    with backend.reserve(task, 1, user="erin") as slots:  # the same check on a reservation's slot
        with pytest.raises(error):
            slots.submit(dog, **options)
        assert slots.remaining == 1  # the slot was not used up


async def test_an_unknown_task_is_refused(backend: InferenceBackend, dog: bytes) -> None:
    with pytest.raises(ModelUnavailable, match="sketch"):
        backend.submit("sketch", dog)
    with pytest.raises(ModelUnavailable, match="sketch"):
        backend.reserve("sketch", 1)


async def test_model_states_name_the_missing_weights_and_the_command_that_gets_them(
    backend: InferenceBackend, dog: bytes, weights_dir: Path
) -> None:
    states = {state.task: state for state in backend.models()}
    assert list(states) == ["classify", "zebra", "caption"]
    ready = states["classify"]
    assert (ready.model, ready.state, ready.runtime, ready.device) == ("efficientnet_lite0", "ready", "onnx", "cpu")
    assert ready.missing == () and ready.error == ""

    zebra = states["zebra"]
    assert zebra.model == "horse2zebra" and zebra.state in ("idle", "unavailable")
    [missing] = zebra.missing
    assert missing.file == "horse2zebra_0.4.0.pth"
    assert missing.path == str(weights_dir / "cyclegan" / "horse2zebra_0.4.0.pth")
    assert missing.url.startswith("https://") and missing.url.endswith("horse2zebra_0.4.0.pth")
    assert missing.command == "python -m inference weights download horse2zebra"
    caption = states["caption"]
    assert {m.file for m in caption.missing} == {"fc-model.pth", "fc-infos.pkl", "resnet101.pth"}
    assert {m.command for m in caption.missing} == {"python -m inference weights download fc"}

    # Asked for, the model says why it cannot answer; `detail` is the former name of `error`.
    with pytest.raises(ModelUnavailable, match="horse2zebra"):
        await backend.submit("zebra", dog)
    zebra = {state.task: state for state in backend.models()}["zebra"]
    assert zebra.state == "unavailable" and "horse2zebra" in zebra.error and zebra.detail == zebra.error
    assert zebra.missing  # still missing


async def test_warm_up_returns_the_states_of_the_tasks_it_was_given(backend: InferenceBackend) -> None:
    states = await backend.warm_up("classify", "zebra")
    assert [(s.task, s.state) for s in states] == [("classify", "ready"), ("zebra", "unavailable")]


# --- closing -------------------------------------------------------------------------------------------


async def test_close_answers_every_request_and_refuses_new_ones(
    backend_factory: Callable[[Settings], InferenceBackend], dog: bytes, phone_dog: bytes
) -> None:
    backend = backend_factory(Settings(**SETTINGS))
    with pytest.raises(ServiceClosed):  # not started yet
        backend.submit("classify", dog)
    await backend.start()
    await backend.warm_up("classify")
    tickets = [backend.submit("classify", phone_dog) for _ in range(12)]
    await wait_until(lambda: backend.stats()["classify"].running > 0, timeout=30)
    await asyncio.wait_for(backend.close(grace_s=30.0), 60)
    results = await settle(tickets, timeout=1.0)
    finished = [r for r in results if isinstance(r, list)]
    closed = [r for r in results if isinstance(r, ServiceClosed)]
    assert len(finished) + len(closed) == 12, results
    assert finished and closed  # the running ones finished, the waiting ones were told
    with pytest.raises(ServiceClosed):
        backend.submit("classify", dog)
    with pytest.raises(ServiceClosed):
        backend.reserve("classify", 1)
    await backend.close()  # idempotent


async def test_the_protocol_check_is_real() -> None:
    """`isinstance(x, InferenceBackend)` looks at every member: a class lacking one is not a backend."""

    class AlmostABackend:
        async def start(self) -> None: ...
        async def close(self, *, grace_s: float = 5.0) -> None: ...
        async def __aenter__(self) -> AlmostABackend: ...
        async def __aexit__(self, *exc_info: object) -> None: ...
        async def warm_up(self, *tasks: str) -> list[object]: ...
        def submit(self, task: str, image: bytes, **options: object) -> object: ...
        def reserve(self, task: str, count: int, **options: object) -> object: ...
        def models(self) -> list[object]: ...
        def pending_for(self, user: object) -> int: ...
        # no stats()

    assert not isinstance(AlmostABackend(), InferenceBackend)
    AlmostABackend.stats = lambda self: None  # type: ignore[attr-defined]
    assert isinstance(AlmostABackend(), InferenceBackend)
