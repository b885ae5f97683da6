"""A server offer made while its session closes: nothing sent, no answer timer left behind."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from mediaserver.config import LimitsConfig, MediaConfig
from mediaserver.session import PeerSession


async def test_a_session_closed_while_its_offer_is_made_sends_nothing_and_keeps_no_timer(
        caplog: pytest.LogCaptureFixture) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    session = PeerSession("p-1", MediaConfig(), LimitsConfig(negotiation_timeout_s=0.2), send)
    making, release = asyncio.Event(), asyncio.Event()
    real = session.pc.setLocalDescription

    async def slow_set_local(description: Any) -> None:
        # aiortc checks for a closed connection first, then awaits ICE gathering: close() can run there
        await real(description)
        making.set()
        await release.wait()

    session.pc.setLocalDescription = slow_set_local  # type: ignore[method-assign]
    session.pc.addTransceiver("audio", direction="sendonly")
    session._ready = True
    session.request_renegotiation()
    await asyncio.wait_for(making.wait(), 5.0)
    await session.close()  # the participant left meanwhile
    release.set()
    with caplog.at_level(logging.WARNING, logger="mediaserver.session"):
        await asyncio.sleep(0.5)  # past the answer timeout
    assert sent == []
    assert session._timeout is None and not session._negotiating
    assert "did not answer" not in caplog.text
