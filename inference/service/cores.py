"""The cores the workers share: each batch is granted threads out of one budget (`cpu_cores`;
0: every core this process may use, `inference.worker.worker_threads`).

Every task has its own worker process, and each would otherwise take every core: a zebra
backlog then oversubscribes the machine and a `classify` waits behind it.  So the service grants
each batch a thread count when it dispatches it, and the batch holds those cores until the worker
reports it finished (its final `Results`).

- **Shares.**  The budget is split between the tasks that have work (waiting or running): a task
  alone gets all of it, two get half each, and so on (the remainder goes to the first tasks in
  `inference.tasks` order, classify first; never less than one thread).  A share is what a task's
  *next* batch may get: a batch in the worker keeps the grant it was sent with.
- **What a task holds.**  A worker runs its batches one after the other (the second batch in
  flight waits in the worker while the first runs), so a task holds the *largest* grant among
  its batches in flight, not their sum.  The sum over tasks never exceeds the budget.
- **Fair and prompt.**  A batch takes its share, or what is free when that is less (at least one
  thread: cores never sit unused while a task waits).  When nothing is free it waits in one
  first-come line across the tasks, and nothing jumps that line, a busy task's next batch
  included: a task that has just got work is served as soon as the batches already sent to the
  busy workers finish (at most `MAX_BATCHES_IN_FLIGHT` each), and the busy tasks' later
  batches get the smaller shares.
- **A core kept for the light task.**  With two cores or more, the heavy tasks (zebra, caption:
  `TaskSpec.heavy`) together never hold the last core while a light one (classify) has work or
  had some in the last `LIGHT_RESERVE_S`: a classify batch takes tens of milliseconds, a zebra
  image hundreds, and in a first-come line of both the classify requests would wait for a
  heavy image at every turn (measured with `bench --mix` on 2 cores: classify p99 5.5× its p99
  alone).  A heavy batch waiting only for that core does not hold the line up for a light one
  behind it.  When classify has been idle that long, the heavy tasks get every core again.

All of it runs on the service's event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from inference.tasks import get_task

#: How long after its last batch a light task keeps a core kept for it (see the docstring).
LIGHT_RESERVE_S = 30.0


@dataclass(frozen=True)
class Grant:
    """Threads granted to one batch of `task`; given back with `CoreBudget.release`."""

    task: str
    threads: int
    #: Tells this grant from the task's others (a task may have two batches in flight).
    number: int


@dataclass(frozen=True)
class CoreEvent:
    """A grant made or returned, and what every task held right after: for `/status`, the bench
    and the tests (`CoreBudget.watch`)."""

    #: "grant" | "release"
    kind: str
    grant: Grant
    #: task → threads it holds (tasks holding none are left out).
    held: dict[str, int]


class CoreBudget:
    """`total` threads shared by the tasks' workers; see the module's docstring for the rules."""

    def __init__(
        self, total: int, tasks: Iterable[str], *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if total < 1:
            raise ValueError(f"a core budget needs at least one core, not {total}")
        self.total = total
        #: In order: who gets the remainder of an uneven split.
        self.tasks = tuple(tasks)
        self.heavy = frozenset(task for task in self.tasks if get_task(task).heavy)
        # Real seconds, like the workers' (a test world's virtual clock never moves the workers).
        self._clock = clock
        #: Light task → when its last batch finished (`_keeping_a_core`).
        self._light_last_seen: dict[str, float] = {}
        self._grants: dict[str, dict[int, int]] = {task: {} for task in self.tasks}
        self._has_work: dict[str, Callable[[], bool]] = {}
        #: Batches waiting for cores, first come first served: (task, the future of its grant).
        self._line: list[tuple[str, asyncio.Future[Grant]]] = []
        self._numbers = itertools.count(1)
        self._watchers: list[Callable[[CoreEvent], None]] = []

    def register(self, task: str, has_work: Callable[[], bool]) -> None:
        """`has_work()`: does `task` have requests waiting or running?  Decides the shares."""
        if task not in self._grants:
            raise ValueError(f"unknown task {task!r} for this core budget: {', '.join(self.tasks)}")
        self._has_work[task] = has_work

    def watch(self, callback: Callable[[CoreEvent], None]) -> None:
        """Call `callback` with every grant made and returned (on the event loop)."""
        self._watchers.append(callback)

    # -- the figures ---------------------------------------------------------------------------

    def held(self, task: str) -> int:
        """The threads `task` holds: its largest grant in flight (its batches run one at a time)."""
        return max(self._grants[task].values(), default=0)

    def holdings(self) -> dict[str, int]:
        return {task: self.held(task) for task in self.tasks if self._grants[task]}

    def free(self) -> int:
        return self.total - sum(self.held(task) for task in self.tasks)

    def active(self, asking: str | None = None) -> list[str]:
        """The tasks with work (and `asking`), in budget order."""
        waiting = {task for task, _ in self._line}
        return [
            task
            for task in self.tasks
            if task == asking or task in waiting or self._grants[task] or self._has_work.get(task, _no_work)()
        ]

    def share(self, task: str) -> int:
        """What `task`'s next batch gets with the cores to spare: its part of the budget."""
        active = self.active(task)
        base, remainder = divmod(self.total, len(active))
        return max(1, base + (1 if active.index(task) < remainder else 0))

    # -- granting ------------------------------------------------------------------------------

    async def acquire(self, task: str) -> Grant:
        """Threads for `task`'s next batch: at once when they are free and nobody is waiting
        ahead, else once the cores come back.  Cancelling the wait gives back what it got."""
        if task not in self._grants:
            raise ValueError(f"unknown task {task!r} for this core budget: {', '.join(self.tasks)}")
        if not self._line:
            grant = self._try_grant(task)
            if grant is not None:
                return grant
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._line.append((task, future))
        self._serve_line()  # a light batch may pass heavy ones that wait for the kept core only
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as the wait was cancelled
                self.release(future.result())
            self._line = [(t, f) for t, f in self._line if f is not future]
            self._serve_line()
            raise

    def release(self, grant: Grant) -> None:
        """The batch is finished (or will never run): its cores are free again.  Idempotent."""
        if self._grants.get(grant.task, {}).pop(grant.number, None) is None:
            return
        if grant.task not in self.heavy:
            self._light_last_seen[grant.task] = self._clock()
        self._tell("release", grant)
        self._serve_line()

    def _try_grant(self, task: str) -> Grant | None:
        # The largest grant that keeps the sum of holdings within the budget: the task may go up
        # to what it holds plus what is free.
        threads = min(self.share(task), self.held(task) + self.free())
        if task in self.heavy and self._keeping_a_core():
            held_by_other_heavy = sum(self.held(other) for other in self.heavy if other != task)
            threads = min(threads, self.total - 1 - held_by_other_heavy)
        if threads < 1:
            return None
        grant = Grant(task, threads, next(self._numbers))
        self._grants[task][grant.number] = threads
        self._tell("grant", grant)
        return grant

    def _keeping_a_core(self) -> bool:
        """Whether the heavy tasks leave a core to the light ones now (see the docstring)."""
        if self.total < 2:
            return False
        now = self._clock()
        for task in self.tasks:
            if task in self.heavy:
                continue
            busy = self._grants[task] or self._has_work.get(task, _no_work)() or any(t == task for t, _ in self._line)
            if busy or now - self._light_last_seen.get(task, float("-inf")) < LIGHT_RESERVE_S:
                return True
        return False

    def _serve_line(self) -> None:
        index = 0
        while index < len(self._line):
            task, future = self._line[index]
            if future.done():  # its waiter was cancelled
                self._line.pop(index)
                continue
            grant = self._try_grant(task)
            if grant is None:
                if task in self.heavy and self.free() > 0:
                    index += 1  # it waits for the core kept for a light task: let one behind pass
                    continue
                return  # the head waits for cores; nobody jumps it
            self._line.pop(index)
            future.set_result(grant)

    def _tell(self, kind: str, grant: Grant) -> None:
        if self._watchers:
            event = CoreEvent(kind, grant, self.holdings())
            for watcher in list(self._watchers):
                watcher(event)


def _no_work() -> bool:
    return False
