"""A byte budget for downloads: how many bytes the whole bot may be downloading at once.

Every image download (an attachment from Discord's CDN, a link through the URL fetcher) first
takes its size from the budget — the attachment's declared size, or the fetcher's per-image
limit for a link, whose size is known only once it has been read — and gives it back when the
bytes have been handed to the inference service.  So a burst of large images from many users
waits here, in turn, instead of holding gigabytes in memory at once.  Pure asyncio: nothing
here blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

class ByteBudget:
    """At most `limit` bytes held at once; waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the download budget must be at least 1 byte, not {limit}")
        self.limit = limit
        self._in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Hold `size` bytes (at most the whole budget, so a large image still gets its turn)
        for the duration of the block."""
        size = min(max(size, 0), self.limit)
        await self._acquire(size)
        try:
            yield
        finally:
            self._in_use -= size
            self._wake()

    async def _acquire(self, size: int) -> None:
        if not self._waiters and self._in_use + size <= self.limit:
            self._in_use += size
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                # Granted just as the waiter went away: give the bytes back.
                self._in_use -= size
            elif entry in self._waiters:
                self._waiters.remove(entry)
            self._wake()
            raise

    def _wake(self) -> None:
        # In order: the first waiter blocks the ones behind it (no starvation of large images).
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self._in_use + size > self.limit:
                return
            self._waiters.popleft()
            self._in_use += size
            future.set_result(None)
