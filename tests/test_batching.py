"""The dynamic batcher on its own: batches, the batch window, and turns between users."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from inference.batching import BatchPolicy, DynamicBatcher


class Item:
    def __init__(self, enqueued_at: float, user: Hashable = None, name: str = "") -> None:
        self.enqueued_at = enqueued_at
        self.user = user
        self.name = name

    def __repr__(self) -> str:
        return self.name or f"Item({self.user})"


def by_user(item: Item) -> Hashable:
    return item.user


async def drain(batcher: DynamicBatcher[Item]) -> list[Item]:
    taken: list[Item] = []
    while len(batcher):
        taken += await batcher.next_batch()
    return taken


async def test_batcher_takes_a_full_batch_without_waiting() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=3, max_wait_s=10.0), loop.time)
    items = [Item(loop.time()) for _ in range(5)]
    for item in items[:3]:  # exactly a full batch
        batcher.put(item)
    # The 10 s window does not apply to a full batch: it leaves at once.
    assert await asyncio.wait_for(batcher.next_batch(), 1.0) == items[:3]
    for item in items[3:]:
        batcher.put(item)
    assert [batcher.position(item) for item in items[3:]] == [0, 1]
    more = [Item(loop.time()) for _ in range(2)]
    for item in more:
        batcher.put(item)
    assert await asyncio.wait_for(batcher.next_batch(), 1.0) == [*items[3:], more[0]]  # more than full: the first 3
    assert batcher.position(more[1]) == 0


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


async def test_users_take_turns() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=1, max_wait_s=0.0), loop.time, by_user)
    alice = [Item(0.0, "alice", f"a{i}") for i in range(1, 7)]
    for item in alice:
        batcher.put(item)
    # Two of Alice's images are taken (the worker's two batch slots) before Bob's arrives.
    assert await batcher.next_batch() == [alice[0]]
    assert await batcher.next_batch() == [alice[1]]
    bob = Item(0.0, "bob", "b1")
    batcher.put(bob)
    assert batcher.position(bob) == 0  # next: Alice has had her turns
    assert [batcher.position(item) for item in alice[2:]] == [1, 2, 3, 4]
    assert await drain(batcher) == [bob, *alice[2:]]


async def test_turns_interleave_users_and_a_late_user_is_not_starved() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=2, max_wait_s=0.0), loop.time, by_user)
    for name in ("a1", "a2", "a3"):
        batcher.put(Item(0.0, "a", name))
    for name in ("b1", "b2"):
        batcher.put(Item(0.0, "b", name))
    carol = Item(0.0, "c", "c1")
    batcher.put(carol)
    order = [item.name for item in await drain(batcher)]
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
    # The batches keep that order too: two at a time.


async def test_without_turns_the_line_is_first_come_first_served() -> None:
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=1, max_wait_s=0.0), loop.time)
    alice = [Item(0.0, "alice", f"a{i}") for i in range(1, 5)]
    for item in alice:
        batcher.put(item)
    await batcher.next_batch()
    bob = Item(0.0, "bob", "b1")
    batcher.put(bob)
    assert batcher.position(bob) == 3
    assert await drain(batcher) == [*alice[1:], bob]


async def test_a_cancelled_turn_is_given_back() -> None:
    """A user whose waiting images were all removed is not sent to the back for them."""
    loop = asyncio.get_running_loop()
    batcher: DynamicBatcher[Item] = DynamicBatcher(BatchPolicy(max_size=1, max_wait_s=0.0), loop.time, by_user)
    dropped = [Item(0.0, "a", f"a{i}") for i in range(5)]
    for item in dropped:
        batcher.put(item)
    for item in dropped:
        assert batcher.remove(item)
    other = Item(0.0, "b", "b1")
    batcher.put(other)
    again = Item(0.0, "a", "a-again")
    batcher.put(again)
    assert await drain(batcher) == [other, again]


@pytest.mark.parametrize("max_size, max_wait_s", [(0, 0.0), (1, -0.1)])
def test_batch_policy_refuses_nonsense(max_size: int, max_wait_s: float) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_size=max_size, max_wait_s=max_wait_s)
