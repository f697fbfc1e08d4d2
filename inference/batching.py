"""Dynamic batching, as Triton's dynamic batcher does it, on one asyncio event loop.

When the consumer asks for the next batch, it gets up to `max_size` requests; if fewer are
waiting, it waits until either the batch is full or the *oldest* waiting request has waited
`max_wait_s` (Triton's `max_queue_delay`), whichever comes first.  A request that already waited
long (because the model was busy) is never held back.

The order of the line: with a `turn_key` (the user), the users take turns — start-time fair
queuing (Goyal et al., 1996): each item gets a start tag, max(the tag of the last item taken,
the finish tag of its user's previous item), and the line is served by start tag, ties in
arrival order.  So one user's six images go one per turn, and a newcomer's image goes next,
ahead of the rest of a user who was just served.  Without a key: first come, first served.

The batcher is only the waiting line: it knows nothing about models, processes or users.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Callable, Hashable, Iterator
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


@dataclass(frozen=True, order=True)
class _Tag:
    """An item's place: served by start tag, then arrival."""

    start: int
    arrival: int


class DynamicBatcher(Generic[Item]):
    def __init__(
        self,
        policy: BatchPolicy,
        clock: Callable[[], float],
        turn_key: Callable[[Item], Hashable] | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._turn_key = turn_key
        #: Waiting items in serving order, and their tags (parallel lists).
        self._waiting: list[Item] = []
        self._tags: list[_Tag] = []
        self._arrivals = itertools.count()
        #: The start tag of the last item taken: the "virtual time" of fair queuing.
        self._now = 0
        #: Per key: the finish tag of its last item taken out of the line.
        self._taken_finish: dict[Hashable, int] = {}
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Item]:
        return iter(list(self._waiting))

    def put(self, item: Item) -> None:
        key = self._key(item)
        start = max(self._now, self._last_finish(key))
        self._insert(item, _Tag(start, next(self._arrivals)))
        self._arrived.set()

    def put_back(self, items: list[Item]) -> None:
        """Return a batch that could not be sent to the front of the line, in its order."""
        for offset, item in enumerate(items):
            # Ahead of everything: the smallest start tag, and arrivals before any other.
            self._insert(item, _Tag(self._now - 1, -len(items) + offset))
        if items:
            self._arrived.set()

    def remove(self, item: Item) -> bool:
        """Take an item out of the line (cancelled, timed out); False if it was not waiting."""
        index = self._index(item)
        if index is None:
            return False
        del self._waiting[index], self._tags[index]
        return True

    def position(self, item: Item) -> int | None:
        """How many items are ahead of this one, or None if it is not waiting."""
        return self._index(item)

    async def wait_for_items(self) -> None:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()

    async def next_batch(self) -> list[Item]:
        """The next batch, in serving order; empty if everything waiting was removed meanwhile."""
        await self.wait_for_items()
        while len(self._waiting) < self.policy.max_size:
            if not self._waiting:
                return []
            oldest = min(item.enqueued_at for item in self._waiting)
            remaining = oldest + self.policy.max_wait_s - self._clock()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
        count = min(len(self._waiting), self.policy.max_size)
        batch, tags = self._waiting[:count], self._tags[:count]
        del self._waiting[:count], self._tags[:count]
        for item, tag in zip(batch, tags):
            self._now = max(self._now, tag.start)
            key = self._key(item)
            self._taken_finish[key] = max(self._taken_finish.get(key, 0), tag.start + 1)
        # A finish tag at or below the virtual time no longer weighs on its key: forget it,
        # so a long-running bot does not keep one entry per user it ever served.
        self._taken_finish = {key: finish for key, finish in self._taken_finish.items() if finish > self._now}
        return batch

    # -- internals ---------------------------------------------------------------------------

    def _key(self, item: Item) -> Hashable:
        return None if self._turn_key is None else self._turn_key(item)

    def _last_finish(self, key: Hashable) -> int:
        """The finish tag of the key's newest item, waiting or taken (its turns so far)."""
        finish = self._taken_finish.get(key, 0)
        for item, tag in zip(self._waiting, self._tags):
            if self._key(item) == key:
                finish = max(finish, tag.start + 1)
        return finish

    def _insert(self, item: Item, tag: _Tag) -> None:
        index = bisect.bisect_right(self._tags, tag)
        self._waiting.insert(index, item)
        self._tags.insert(index, tag)

    def _index(self, item: Item) -> int | None:
        for index, waiting in enumerate(self._waiting):
            if waiting is item:
                return index
        return None
