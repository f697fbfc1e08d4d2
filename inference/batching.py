"""Dynamic batching, as Triton's dynamic batcher does it, on one asyncio event loop.

Requests wait in arrival order.  When the consumer asks for the next batch, it gets up to
`max_size` of them; if fewer are waiting, it waits until either the batch is full or the
*oldest* waiting request has waited `max_wait_s` (Triton's `max_queue_delay`), whichever comes
first.  A request that already waited long (because the model was busy) is never held back.

The batcher is only the waiting line: it knows nothing about models, processes or users.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    #: When the item joined the line, on the event loop's clock (`loop.time()`).
    enqueued_at: float


Item = TypeVar("Item", bound=Queued)


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int = 8
    max_wait_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max batch size must be at least 1, not {self.max_size}")
        if self.max_wait_s < 0:
            raise ValueError(f"max batch wait must not be negative, not {self.max_wait_s}")


class DynamicBatcher(Generic[Item]):
    def __init__(self, policy: BatchPolicy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self._clock = clock
        self._waiting: deque[Item] = deque()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Item]:
        return iter(list(self._waiting))

    def put(self, item: Item) -> None:
        self._waiting.append(item)
        self._arrived.set()

    def put_back(self, items: list[Item]) -> None:
        """Return a batch that could not be sent to the front of the line, in its order."""
        self._waiting.extendleft(reversed(items))
        if items:
            self._arrived.set()

    def remove(self, item: Item) -> bool:
        """Take an item out of the line (cancelled, timed out); False if it was not waiting."""
        try:
            self._waiting.remove(item)
        except ValueError:
            return False
        return True

    def position(self, item: Item) -> int | None:
        """How many items are ahead of this one, or None if it is not waiting."""
        try:
            return self._waiting.index(item)
        except ValueError:
            return None

    async def wait_for_items(self) -> None:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()

    async def next_batch(self) -> list[Item]:
        """The next batch, in arrival order; empty if everything waiting was removed meanwhile."""
        await self.wait_for_items()
        while len(self._waiting) < self.policy.max_size:
            if not self._waiting:
                return []
            remaining = self._waiting[0].enqueued_at + self.policy.max_wait_s - self._clock()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
        count = min(len(self._waiting), self.policy.max_size)
        return [self._waiting.popleft() for _ in range(count)]
