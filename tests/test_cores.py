"""The core budget the workers share (issue 9): its arithmetic and fairness as a unit, the worker
applying a batch's grant, and the budget under a real mixed load through the service (the real
EfficientNet-Lite0 and a generated CycleGAN checkpoint)."""

from __future__ import annotations

import asyncio
import io
import os
import random
import threading
import time
from collections.abc import Iterator
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from config import Settings, SettingsError
from inference.service import InferenceService
from inference.service.cores import CoreBudget, CoreEvent, Grant
from inference.worker.process import _Worker, worker_threads
from inference.worker.protocol import Batch, Results, Stop, WorkerConfig, WorkItem, frames
from tests.conftest import IMAGES

TASKS = ("classify", "zebra", "caption")


def budget(total: int, working: set[str] | None = None) -> CoreBudget:
    """A budget over the three tasks; `working`: the tasks whose lanes say they have work."""
    cores = CoreBudget(total, TASKS)
    for task in TASKS:
        cores.register(task, lambda task=task: working is not None and task in working)
    return cores


def recorded(cores: CoreBudget) -> list[CoreEvent]:
    events: list[CoreEvent] = []
    cores.watch(events.append)
    return events


# --- the budget's arithmetic ----------------------------------------------------------------------


def test_the_setting_names_the_budget_and_zero_means_every_core() -> None:
    assert worker_threads(3) == 3
    assert worker_threads(0) == len(os.sched_getaffinity(0))
    assert Settings.from_env({"CPU_CORES": "6"}, env_file=None).cpu_cores == 6
    with pytest.raises(SettingsError, match="CPU_CORES"):
        Settings.from_env({"TORCH_THREADS": "2"}, env_file=None)
    with pytest.raises(SettingsError, match="CPU_CORES"):
        Settings(cpu_cores=-1)


def test_shares_split_the_budget_between_the_tasks_with_work() -> None:
    assert budget(16).share("zebra") == 16  # alone: all of it
    assert budget(16, {"zebra"}).share("classify") == 8
    three = budget(16, {"classify", "zebra", "caption"})
    # 16 = 6 + 5 + 5: the remainder goes to the first tasks, classify first.
    assert [three.share(task) for task in TASKS] == [6, 5, 5]
    assert sum(three.share(task) for task in TASKS) == 16
    # Fewer cores than tasks: one thread each, never none.
    assert [budget(2, set(TASKS)).share(task) for task in TASKS] == [1, 1, 1]


async def test_a_task_alone_gets_everything_and_its_two_batches_in_flight_count_once() -> None:
    cores = budget(4, {"zebra"})
    first = await cores.acquire("zebra")
    second = await cores.acquire("zebra")  # the next batch, sent while the first runs
    assert first.threads == second.threads == 4
    # The worker runs them one after the other: the task holds 4 cores, not 8.
    assert cores.held("zebra") == 4 and cores.free() == 0
    cores.release(first)
    assert cores.held("zebra") == 4  # the second one still runs
    cores.release(second)
    cores.release(second)  # twice: no effect
    assert cores.held("zebra") == 0 and cores.free() == 4


async def test_a_task_that_gets_work_is_served_before_the_busy_task_takes_more() -> None:
    working = {"zebra"}
    cores = budget(2, working)
    events = recorded(cores)
    zebra_first = await cores.acquire("zebra")
    zebra_second = await cores.acquire("zebra")
    assert zebra_first.threads == zebra_second.threads == 2

    working.add("classify")  # a classify request arrives during the zebra backlog
    classify = asyncio.ensure_future(cores.acquire("classify"))
    await asyncio.sleep(0)
    assert not classify.done()  # zebra holds every core
    zebra_third = asyncio.ensure_future(cores.acquire("zebra"))  # queues behind classify
    await asyncio.sleep(0)
    assert not zebra_third.done()

    cores.release(zebra_first)
    await asyncio.sleep(0)
    assert not classify.done()  # the second zebra batch still holds the cores
    cores.release(zebra_second)
    await asyncio.sleep(0)
    assert classify.done() and zebra_third.done()
    granted = [event.grant.task for event in events if event.kind == "grant"]
    assert granted == ["zebra", "zebra", "classify", "zebra"]  # classify first
    # Both now get their half: zebra's next batch got the smaller grant.
    assert classify.result().threads == 1 and zebra_third.result().threads == 1
    assert cores.holdings() == {"classify": 1, "zebra": 1}


async def test_heavy_tasks_leave_a_core_to_classify_while_it_is_in_use_and_take_it_back_after() -> None:
    now = [100.0]
    working = {"zebra", "caption", "classify"}
    cores = CoreBudget(2, TASKS, clock=lambda: now[0])
    for task in TASKS:
        cores.register(task, lambda task=task: task in working)
    classify = await cores.acquire("classify")
    zebra = await cores.acquire("zebra")
    assert (classify.threads, zebra.threads) == (1, 1)
    caption = asyncio.ensure_future(cores.acquire("caption"))  # waits: the last core is classify's
    await asyncio.sleep(0)
    cores.release(classify)
    await asyncio.sleep(0)
    assert not caption.done()  # classify still has work: its core stays kept
    again = await asyncio.wait_for(cores.acquire("classify"), 5)  # passes the heavy batch waiting in line
    assert again.threads == 1 and not caption.done()
    cores.release(again)
    working.discard("classify")
    now[0] += 29.0
    cores.release(zebra)
    await asyncio.sleep(0)
    assert caption.done() and caption.result().threads == 1  # zebra's core; the kept one still kept
    now[0] += 2.0  # classify idle for LIGHT_RESERVE_S: the heavy tasks may take every core again
    working.discard("zebra")
    cores.release(caption.result())
    assert (await cores.acquire("caption")).threads == 2


async def test_when_a_task_runs_out_of_work_the_others_next_batches_get_its_share() -> None:
    working = {"zebra", "caption"}
    cores = budget(8, working)
    zebra, caption = await cores.acquire("zebra"), await cores.acquire("caption")
    assert (zebra.threads, caption.threads) == (4, 4)
    working.discard("caption")
    assert (await cores.acquire("zebra")).threads == 4  # caption's batch still holds its cores
    cores.release(caption)
    assert cores.holdings() == {"zebra": 4}
    assert (await cores.acquire("zebra")).threads == 8  # alone now: everything


async def test_a_cancelled_wait_leaves_the_line_and_keeps_nothing() -> None:
    cores = budget(1, {"zebra", "caption"})
    held = await cores.acquire("zebra")
    waiting = asyncio.ensure_future(cores.acquire("caption"))
    behind = asyncio.ensure_future(cores.acquire("classify"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    cores.release(held)
    assert (await asyncio.wait_for(behind, 1)).task == "classify"
    assert cores.holdings() == {"classify": 1}


async def test_under_random_load_the_grants_never_exceed_the_budget_and_everyone_is_served() -> None:
    rng = random.Random(9)
    for total in (1, 2, 3, 8, 16):
        working: set[str] = set()
        cores = budget(total, working)
        over: list[CoreEvent] = []
        cores.watch(lambda event: over.append(event) if sum(event.held.values()) > total else None)
        served = {task: 0 for task in TASKS}

        async def lane(task: str, batches: int) -> None:
            """A lane's dispatcher: two batches in flight at most; its worker (a task that
            sleeps) gives each batch's cores back when it is done."""
            working.add(task)
            slots = asyncio.Semaphore(2)

            async def worker(grant: Grant) -> None:
                await asyncio.sleep(rng.random() / 500)
                cores.release(grant)
                slots.release()

            running = []
            for _ in range(batches):
                await slots.acquire()
                grant = await cores.acquire(task)
                served[task] += 1
                running.append(asyncio.ensure_future(worker(grant)))
            await asyncio.gather(*running)
            working.discard(task)

        await asyncio.wait_for(asyncio.gather(*(lane(task, 40) for task in TASKS)), 30)
        assert over == []
        assert served == {task: 40 for task in TASKS}
        assert cores.free() == total


# --- the worker applies the grant ------------------------------------------------------------------


class ThreadRecordingPipeline:
    """A stand-in model that notes the threads each run had: torch's, or those it was given."""

    name = "fake"
    draft_size = None
    fixed_input_size = True

    def __init__(self, own_threads: bool) -> None:
        self.runs: list[int] = []
        self.given: int | None = None
        if own_threads:  # an ONNX Runtime pipeline: it sets its own thread pools
            self.set_threads = self._set_threads

    def _set_threads(self, threads: int) -> None:
        self.given = threads

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, 4, 4)

    def run(self, inputs: list[torch.Tensor], options: list[dict[str, Any]]) -> list[Any]:
        self.runs.append(self.given if self.given is not None else torch.get_num_threads())
        return ["ok"] * len(inputs)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def worker_with() -> Iterator[Any]:
    started: list[tuple[Any, threading.Thread]] = []

    def start(pipeline: ThreadRecordingPipeline) -> Any:
        parent, child = Pipe(duplex=True)
        worker = _Worker(WorkerConfig.from_settings("classify", Settings(device="cpu", cpu_cores=3)), child)
        worker.pipeline = pipeline
        thread = threading.Thread(target=worker.serve, daemon=True)
        thread.start()
        started.append((parent, thread))
        return parent, worker

    yield start
    for parent, thread in started:
        for frame in frames(Stop()):
            parent.send_bytes(frame)
        thread.join(5)
        parent.close()


def run_batch(parent: Any, batch: Batch) -> Results:
    for frame in frames(batch):
        parent.send_bytes(frame)
    while True:
        assert parent.poll(10), "the worker did not answer"
        message = parent.recv()
        if isinstance(message, Results) and message.final:
            return message


@pytest.mark.parametrize("own_threads", [False, True], ids=["torch", "set_threads"])
def test_the_worker_runs_each_batch_with_its_grant(worker_with: Any, own_threads: bool) -> None:
    pipeline = ThreadRecordingPipeline(own_threads)
    parent, worker = worker_with(pipeline)
    assert worker.threads == 3  # the budget, until a batch brings its grant
    final = run_batch(parent, Batch(1, [WorkItem(1, png(), {}), WorkItem(2, png(), {})], threads=2))
    assert final.threads == 2 and worker.threads == 2 and worker.decoders._max_workers == 2
    run_batch(parent, Batch(2, [WorkItem(3, png(), {})], threads=1))
    run_batch(parent, Batch(3, [WorkItem(4, png(), {})]))  # no grant: keeps the last one
    assert pipeline.runs == [2, 1, 1]


# --- under a real mixed load through the service ---------------------------------------------------


def jpeg(size: tuple[int, int]) -> bytes:
    with Image.open(IMAGES / "bobby.jpg") as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize(size).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()


@pytest.mark.asyncio
async def test_mixed_load_stays_within_the_budget_and_classify_does_not_wait_for_the_zebra_backlog(
    tmp_path: Path,
) -> None:
    from tests.checkpoints import write_cyclegan_checkpoint

    write_cyclegan_checkpoint(tmp_path / "cyclegan" / "horse2zebra_0.4.0.pth")
    settings = Settings(
        device="cpu", cpu_cores=2, weights_dir=tmp_path, zebra_size=64, max_batch_size=4,
        max_batch_wait_ms=5.0, zebra_queue_size=16, request_timeout_s=120.0,
    )
    photo = jpeg((320, 240))
    async with InferenceService(settings) as service:
        assert service.cores is not None and service.cores.total == 2
        states = await service.warm_up("classify", "zebra")
        assert [state.state for state in states] == ["ready", "ready"], states
        events: list[tuple[CoreEvent, int]] = []  # with the zebra requests still in line then
        service.cores.watch(lambda event: events.append((event, service.stats()["zebra"].waiting)))

        zebras = [service.submit("zebra", photo) for _ in range(8)]
        deadline = time.monotonic() + 60
        while service.stats()["zebra"].running == 0:
            assert time.monotonic() < deadline and not any(zebra.done() for zebra in zebras), "zebra did not start"
            await asyncio.sleep(0.005)
        assert service.stats()["zebra"].threads == 2  # alone: the whole budget
        classify = service.submit("classify", photo)
        started = time.perf_counter()
        await asyncio.wait_for(classify, 60)
        classify_waited = time.perf_counter() - started
        for zebra in zebras:
            assert (await asyncio.wait_for(zebra, 120))[:8] == b"\x89PNG\r\n\x1a\n"
        # The last answer comes just before the worker's word that the batch is over.
        while service.cores.holdings():
            assert time.monotonic() < deadline + 120, service.cores.holdings()
            await asyncio.sleep(0.005)
        stats = service.stats()
        assert stats.cpu_cores == 2 and stats["zebra"].threads == stats["classify"].threads == 0

    assert events and all(sum(event.held.values()) <= 2 for event, _ in events)
    grants = [(event.grant, zebra_waiting) for event, zebra_waiting in events if event.kind == "grant"]
    [(classify_grant, zebra_waiting_then)] = [(g, w) for g, w in grants if g.task == "classify"]
    # Dispatched while most of the zebra backlog was still in line, with half the budget.
    assert zebra_waiting_then >= 4, (zebra_waiting_then, classify_waited)
    assert classify_grant.threads == 1
    zebra_threads = [grant.threads for grant, _ in grants if grant.task == "zebra"]
    assert zebra_threads[0] == 2 and 1 in zebra_threads  # its batches after classify came got less
