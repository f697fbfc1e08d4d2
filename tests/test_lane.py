"""One task's lane without a worker process: its line, positions, retry hints, deadlines, counts."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

import pytest

from config import Settings
from inference.errors import RequestTimeout, WorkerCrashed
from inference.service.lane import MAX_RETRY_AFTER_S, MIN_RETRY_AFTER_S, InFlight, Request, TaskLane
from inference.service.supervisor import STALL_GRACE_S
from inference.service.types import LATENCY_WINDOW
from inference.tasks import get_task
from inference.worker import Outcome, Results, Started


def make_lane(**settings: Any) -> TaskLane:
    return TaskLane(Settings(device="cpu", **settings), get_task("classify"), asyncio.get_running_loop())


def make_request(lane: TaskLane, number: int, user: Hashable = None, timeout_s: float = 60.0) -> Request:
    return Request(
        id=number, task=lane.task, image=b"image", options={}, user=user, future=lane.loop.create_future(),
        enqueued_at=lane.loop.time(), timeout_s=timeout_s,
    )


def line_up(lane: TaskLane, count: int) -> list[Request]:
    """Requests put in the line directly: no dispatcher, so no worker starts."""
    requests = [make_request(lane, number) for number in range(1, count + 1)]
    for request in requests:
        lane.batcher.put(request)
    return requests


def hand_to_worker(lane: TaskLane, batch_id: int, requests: list[Request]) -> InFlight:
    for request in requests:
        lane.batcher.remove(request)
        request.phase = "sent"
    flight = InFlight({r.id: r for r in requests}, lane.loop.time(), len(requests), max(r.deadline for r in requests))
    lane.in_flight[batch_id] = flight
    return flight


async def test_the_retry_hint_follows_the_measured_speed() -> None:
    lane = make_lane()
    line_up(lane, 9)  # 9 waiting + this one = 10 requests to get through
    lane.learn_speed(sent_at=0.0, size=4, now=2.0)  # 0.5 s per request
    assert lane.retry_after() == 5.0
    slower = make_lane()
    line_up(slower, 9)
    slower.learn_speed(sent_at=0.0, size=2, now=3.0)  # 1.5 s per request
    assert slower.retry_after() == 15.0
    # Each batch moves the estimate a fifth of the way: 0.5 → 0.8 × 0.5 + 0.2 × 3.0 = 1.0 s.
    lane.learn_speed(sent_at=2.0, size=1, now=5.0)
    assert lane.retry_after() == 10.0


async def test_the_retry_hint_stays_within_its_bounds() -> None:
    fast = make_lane()
    fast.learn_speed(sent_at=0.0, size=100, now=0.1)
    assert fast.retry_after() == MIN_RETRY_AFTER_S
    slow = make_lane()
    line_up(slow, 50)
    slow.learn_speed(sent_at=0.0, size=1, now=30.0)
    assert slow.retry_after() == MAX_RETRY_AFTER_S


async def test_a_batch_sent_behind_another_is_timed_from_when_the_worker_was_free() -> None:
    lane = make_lane()
    lane.learn_speed(sent_at=0.0, size=1, now=1.0)  # 1 s
    lane.learn_speed(sent_at=0.5, size=1, now=2.0)  # sent during the first: worked 1.0 s, not 1.5 s
    assert lane.seconds_per_request == pytest.approx(1.0)


async def test_positions_count_only_what_is_ahead_and_not_started() -> None:
    lane = make_lane()
    first, second, third, fourth = line_up(lane, 4)
    assert [lane.position(r) for r in (first, second, third, fourth)] == [0, 1, 2, 3]
    hand_to_worker(lane, 1, [first, second])
    assert [lane.position(r) for r in (first, second, third, fourth)] == [0, 1, 2, 3]
    lane.on_worker_message(Started(1))  # the worker took them up: no longer ahead of anyone
    assert [lane.position(r) for r in (first, second, third, fourth)] == [0, 0, 0, 1]
    assert (lane.waiting(), lane.stats().running) == (2, 2)
    lane.on_worker_message(Results(1, [], final=True))
    third.future.cancel()
    lane.forget(third)  # what the service does once a request's future is done
    assert lane.position(third) == 0 and lane.position(fourth) == 0
    assert lane.stats().cancelled == 1


async def test_results_answer_requests_and_feed_the_counts_and_percentiles() -> None:
    lane = make_lane()
    requests = line_up(lane, 3)
    hand_to_worker(lane, 1, requests)
    lane.on_worker_message(Started(1))
    lane.on_worker_message(
        Results(1, [Outcome(1, value="a"), Outcome(2, error=WorkerCrashed("no"))], model_batch=2, model_seconds=0.5)
    )
    lane.on_worker_message(Results(1, [], final=True, skipped=1))
    assert requests[0].future.result() == "a"
    assert isinstance(requests[1].future.exception(), WorkerCrashed)
    assert "no result" in str(requests[2].future.exception())  # the worker owed it an answer
    stats = lane.stats()
    assert (stats.done, stats.failed, stats.ran, stats.skipped_in_worker) == (1, 2, 2, 1)
    assert stats.batch_sizes == {2: 1} and stats.model_seconds == 0.5
    assert lane.in_flight == {} and lane.seconds_per_request is not None


async def test_percentiles_cover_a_bounded_window_of_recent_requests() -> None:
    lane = make_lane()
    lane.latencies.extend([100.0] * 50)  # long ago: pushed out of the window below
    lane.latencies.extend(float(seconds) for seconds in range(1, LATENCY_WINDOW + 1))
    stats = lane.stats()
    assert stats.p50_ms == pytest.approx(LATENCY_WINDOW * 0.50 * 1000)
    assert stats.p95_ms == pytest.approx(round(LATENCY_WINDOW * 0.95 + 0.5) * 1000)
    assert make_lane().stats().p50_ms == 0.0  # none yet


async def test_a_request_past_its_deadline_times_out_once() -> None:
    lane = make_lane()
    [request] = line_up(lane, 1)
    lane.expire(request)
    lane.expire(request)
    assert isinstance(request.future.exception(), RequestTimeout)
    assert lane.stats().timed_out == 1


async def test_the_hang_deadline_is_the_oldest_batchs_own() -> None:
    lane = make_lane()
    assert lane.hang_deadline() is None
    short = make_request(lane, 1, timeout_s=2.0)
    flight = hand_to_worker(lane, 1, [short])
    assert lane.hang_deadline() == pytest.approx(short.deadline + STALL_GRACE_S)
    flight.started_at = short.deadline + 10.0  # taken up late: judged from then
    assert lane.hang_deadline() == pytest.approx(short.deadline + 10.0 + STALL_GRACE_S)


async def test_a_lost_worker_fails_what_it_held_and_on_request_the_line() -> None:
    lane = make_lane()
    held, waiting = line_up(lane, 2)
    hand_to_worker(lane, 1, [held])
    lane.on_worker_lost(WorkerCrashed("gone"), fail_waiting=False)
    assert str(held.future.exception()) == "gone" and not waiting.future.done()
    assert lane.in_flight == {}
    lane.on_worker_lost(WorkerCrashed("hung"), fail_waiting=True)
    assert str(waiting.future.exception()) == "hung" and len(lane.batcher) == 0


async def test_a_worker_that_cannot_start_fails_the_line_and_the_lane_carries_on() -> None:
    lane = make_lane()
    starts: list[int] = []

    async def cannot_start() -> Any:
        starts.append(1)
        raise WorkerCrashed("The classify model could not be started (no more processes).")

    lane.supervisor.ensure_worker = cannot_start  # type: ignore[method-assign]
    first = make_request(lane, 1)
    lane.enqueue(first)
    with pytest.raises(WorkerCrashed, match="could not be started"):
        await asyncio.wait_for(first.future, 1)
    second = make_request(lane, 2)  # the dispatcher is still there for the next one
    lane.enqueue(second)
    with pytest.raises(WorkerCrashed):
        await asyncio.wait_for(second.future, 1)
    assert len(starts) == 2 and lane.stats().failed == 2
    lane.stop_dispatching()
