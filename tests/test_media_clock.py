"""The media clock after an event-loop stall: the network is read before the ticks catch up."""

from __future__ import annotations

import asyncio
import socket
import time

from mediaserver.clock import MediaClock


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.got.append(data)


async def test_datagrams_that_came_during_a_stall_are_read_before_the_catch_up_ticks() -> None:
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(_Inbox, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    clock = MediaClock()
    seen: list[tuple[int, int]] = []  # (tick, datagrams read by then)
    stalled = asyncio.Event()

    def on_tick() -> None:
        seen.append((clock.ticks, len(inbox.got)))
        if clock.ticks == 20 and not stalled.is_set():
            stalled.set()
            # a 40 ms stall of the loop (under the skip threshold) while a packet comes in
            sender.sendto(b"rtp", ("127.0.0.1", port))
            time.sleep(0.04)

    try:
        clock.add("probe", on_tick)
        while len(seen) < 40:
            await asyncio.sleep(0.02)
    finally:
        await clock.close()
        transport.close()
        sender.close()
    after = [n for tick, n in seen if tick == 21]
    assert after == [1], f"the first tick after the stall ran before the datagram was read: {seen[18:26]}"
