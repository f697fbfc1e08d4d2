"""The supervisor's judgement and bookkeeping, with a stand-in worker handle and lane.

The real thing (a worker past its memory ceiling, a load that never ends, a hung model) runs in
`test_queue_safety.py` and `test_service.py`; here each rule is checked on its own, in
milliseconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from config import Settings
from inference.errors import InferenceError, ModelUnavailable, WorkerCrashed
from inference.service.supervisor import WorkerSupervisor, worker_clock
from inference.tasks import get_task
from inference.worker import Started, StateChanged

MB = 1024 * 1024


class FakeWorker:
    def __init__(self, rss_mb: float | None = 100.0) -> None:
        self.rss_mb = rss_mb
        self.pid = 4242
        self.stopping = False
        self.killed = False

    def resident_memory_bytes(self) -> int | None:
        return None if self.rss_mb is None else int(self.rss_mb * MB)

    def kill(self) -> None:
        self.killed = True


class FakeLane:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lost: list[tuple[InferenceError, bool]] = []
        self.devices: list[str] = []
        self.deadline: float | None = None

    def on_worker_message(self, message: Any) -> None:
        self.messages.append(message)

    def on_worker_lost(self, error: InferenceError, fail_waiting: bool) -> None:
        self.lost.append((error, fail_waiting))

    def on_device(self, device_type: str) -> None:
        self.devices.append(device_type)

    def hang_deadline(self) -> float | None:
        return self.deadline


def supervised(rss_mb: float | None = 100.0, **settings: Any) -> tuple[WorkerSupervisor, FakeWorker, FakeLane]:
    lane = FakeLane()
    supervisor = WorkerSupervisor(
        Settings(device="cpu", **settings), get_task("classify"), asyncio.get_running_loop(), lane
    )
    worker = FakeWorker(rss_mb)
    supervisor.worker = worker  # type: ignore[assignment]
    supervisor._on_message(worker, StateChanged("ready", model="efficientnet_lite0", device="cpu"))  # type: ignore[arg-type]
    return supervisor, worker, lane


async def test_a_healthy_worker_is_left_alone_and_its_memory_is_recorded() -> None:
    supervisor, worker, lane = supervised(rss_mb=300, classify_max_memory_mb=1000)
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]
    worker.rss_mb = 200
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]
    assert supervisor.memory_bytes == 200 * MB and supervisor.peak_memory_bytes == 300 * MB


async def test_a_worker_past_its_memory_ceiling_must_go() -> None:
    supervisor, worker, lane = supervised(rss_mb=1500, classify_max_memory_mb=1000)
    kill = supervisor.judge(worker)  # type: ignore[arg-type]
    assert kill is not None and isinstance(kill.error, WorkerCrashed)
    assert "1500 MB" in str(kill.error) and "1000 MB" in str(kill.error)
    assert kill.state == "idle" and not kill.fail_waiting
    unlimited, worker, _ = supervised(rss_mb=1500, classify_max_memory_mb=0)
    assert unlimited.judge(worker) is None  # type: ignore[arg-type]


async def test_a_load_past_its_deadline_fails_the_line_and_leaves_the_model_unavailable() -> None:
    supervisor, worker, lane = supervised(model_load_timeout_s=10.0)
    supervisor._on_message(worker, StateChanged("loading"))  # type: ignore[arg-type]
    supervisor._loading_since = worker_clock() - 9.0
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]
    lane.deadline = 0.0  # a batch waiting on the load is judged by the load's deadline, not its own
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]
    supervisor._loading_since = worker_clock() - 11.0
    kill = supervisor.judge(worker)  # type: ignore[arg-type]
    assert kill is not None and isinstance(kill.error, ModelUnavailable)
    assert "within 10 s" in str(kill.error) and kill.state == "unavailable" and kill.fail_waiting


async def test_a_batch_past_its_hang_deadline_means_a_hung_worker() -> None:
    supervisor, worker, lane = supervised()
    lane.deadline = worker_clock() + 1.0
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]
    lane.deadline = worker_clock() - 0.1
    kill = supervisor.judge(worker)  # type: ignore[arg-type]
    assert kill is not None and "stopped responding" in str(kill.error) and kill.state == "idle"


async def test_what_the_worker_says_becomes_the_model_state() -> None:
    supervisor, worker, lane = supervised()
    state = supervisor.model_state()
    assert (state.model, state.state, state.device, state.worker_pid) == ("efficientnet_lite0", "ready", "cpu", 4242)
    assert lane.devices == ["cpu"]
    supervisor._on_message(worker, StateChanged("unavailable", error="weights missing"))  # type: ignore[arg-type]
    state = supervisor.model_state()
    assert state.state == "unavailable" and state.error == state.detail == "weights missing"
    supervisor._on_message(worker, Started(3))  # type: ignore[arg-type]
    assert lane.messages == [Started(3)]  # about requests: the lane's business
    supervisor._on_message(FakeWorker(), Started(4))  # type: ignore[arg-type]
    assert lane.messages == [Started(3)]  # from a replaced worker: ignored


async def test_a_killed_worker_tells_the_lane_why() -> None:
    supervisor, worker, lane = supervised(rss_mb=1500, classify_max_memory_mb=1000)
    supervisor._kill = supervisor.judge(worker)  # type: ignore[arg-type]
    supervisor._on_exit(worker, -9)  # type: ignore[arg-type]
    [(error, fail_waiting)] = lane.lost
    assert "memory" in str(error) and not fail_waiting
    state = supervisor.model_state()
    assert state.state == "idle" and "memory" in state.error and state.worker_pid is None
    assert supervisor.crashes == 1 and supervisor.worker is None


async def test_a_crash_is_reported_and_a_requested_stop_is_not() -> None:
    supervisor, worker, lane = supervised()
    supervisor._on_exit(worker, -11)  # type: ignore[arg-type]
    [(error, fail_waiting)] = lane.lost
    assert isinstance(error, WorkerCrashed) and "crashed" in str(error) and not fail_waiting
    assert "signal 11" in supervisor.model_state().error and supervisor.crashes == 1

    stopping, worker, lane = supervised()
    worker.stopping = True
    stopping._on_exit(worker, 0)  # type: ignore[arg-type]
    assert lane.lost == [] and stopping.crashes == 0
    assert (stopping.model_state().state, stopping.model_state().error) == ("idle", "")


@pytest.mark.parametrize("state", ["ready", "unavailable"])
async def test_warm_up_waits_for_the_load_to_settle(state: str) -> None:
    supervisor, worker, lane = supervised()
    supervisor._on_message(worker, StateChanged("loading"))  # type: ignore[arg-type]
    sent: list[Any] = []
    worker.send = sent.append  # type: ignore[attr-defined]
    warming = asyncio.ensure_future(supervisor.warm_up())
    await asyncio.sleep(0.01)
    assert not warming.done() and sent == []  # loading already: no second Load
    supervisor._on_message(worker, StateChanged(state))  # type: ignore[arg-type]
    await asyncio.wait_for(warming, 1)


async def test_the_default_ceiling_follows_what_the_worker_says_it_needs() -> None:
    # DECODE_MEMORY_MB=100: the need (400 MB) + 100 + a quarter of the need as headroom = 600 MB.
    supervisor, worker, lane = supervised(rss_mb=550, decode_memory_mb=100)
    assert supervisor.memory_ceiling_mb() == get_task("classify").fallback_memory_mb  # nothing said yet
    supervisor._on_message(worker, StateChanged("ready", model="efficientnet_lite0", memory_need=400 * MB))  # type: ignore[arg-type]
    assert supervisor.memory_ceiling_mb() == 600
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]
    worker.rss_mb = 650
    kill = supervisor.judge(worker)  # type: ignore[arg-type]
    assert kill is not None and "650 MB" in str(kill.error) and "600 MB" in str(kill.error)


async def test_a_model_loading_beside_the_first_is_held_to_the_fixed_ceiling_until_it_reports() -> None:
    supervisor, worker, lane = supervised(rss_mb=700, decode_memory_mb=100)
    supervisor._on_message(worker, StateChanged("ready", model="efficientnet_lite0", memory_need=400 * MB))  # type: ignore[arg-type]
    supervisor._on_message(worker, StateChanged("loading"))  # type: ignore[arg-type]  # a second model (a style)
    assert supervisor.judge(worker) is None  # type: ignore[arg-type]  # 700 MB: over 600, under the fixed one
    supervisor._on_message(worker, StateChanged("ready", memory_need=560 * MB))  # type: ignore[arg-type]
    assert supervisor.memory_ceiling_mb() == 800 and supervisor.judge(worker) is None  # type: ignore[arg-type]


async def test_a_configured_ceiling_wins_over_the_measured_need() -> None:
    supervisor, worker, lane = supervised(rss_mb=700, classify_max_memory_mb=650)
    supervisor._on_message(worker, StateChanged("ready", model="efficientnet_lite0", memory_need=100 * MB))  # type: ignore[arg-type]
    assert supervisor.memory_ceiling_mb() == 650
    assert supervisor.judge(worker) is not None  # type: ignore[arg-type]
