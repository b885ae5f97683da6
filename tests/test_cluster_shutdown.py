"""A node's room bus stops when asked, even when its Redis client turns the cancellation into an error.

redis-py can raise a connection error instead of ``CancelledError`` when a read is cancelled; the bus's
read loop, which retries after connection errors, then kept running and ``ClusterBus.close`` waited for
it forever: a node with a spanning room did not stop on SIGINT (bench/cluster_latency.py found it: killed
after 20 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from signaling.cluster.interbus import ClusterBus


class _CancelTurnsIntoAnError:
    """A pub/sub whose blocking read answers a cancellation with a connection error."""

    def __init__(self) -> None:
        self.reads = 0
        self.closed = False

    async def subscribe(self, *channels: str) -> None:
        pass

    async def get_message(self, **kwargs: Any) -> None:
        self.reads += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if self.reads == 1:  # the first one (later ones are let through: the test ends either way)
                raise ConnectionError("Connection closed by server.") from None
            raise

    async def aclose(self) -> None:
        self.closed = True


class _Redis:
    def __init__(self) -> None:
        self.pubsub_instance = _CancelTurnsIntoAnError()

    def pubsub(self) -> _CancelTurnsIntoAnError:
        return self.pubsub_instance


async def test_the_room_bus_stops_although_the_cancelled_read_raised_a_connection_error() -> None:
    redis = _Redis()
    bus = ClusterBus(redis, hub=None, node_id="node-a")  # type: ignore[arg-type]
    await bus.start()
    await asyncio.sleep(0.05)  # the loop is inside a read
    started = time.monotonic()
    closing = asyncio.ensure_future(bus.close())
    await asyncio.wait({closing}, timeout=5.0)
    stuck = not closing.done()
    if stuck:  # end the test's tasks
        assert bus._task is not None
        bus._task.cancel()
        await asyncio.wait({closing, bus._task}, timeout=5.0)
    assert not stuck, "ClusterBus.close() waited for a read loop that went on"
    assert time.monotonic() - started < 5.0
    assert bus._task is not None and bus._task.done()
    assert redis.pubsub_instance.closed
    await asyncio.sleep(1.5)
    assert redis.pubsub_instance.reads == 1, "the read loop went on after close"
