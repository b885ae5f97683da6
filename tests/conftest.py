"""Shared fixtures: a real server on a loopback port, real recordings from ../shared/eval."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import numpy as np
import pytest
from aiohttp import web

from enhancers.audio_io import read_48k
from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
from mediaserver.server import MediaServer
from signaling.app import create_app

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def eval_file(*parts: str) -> Path:
    path = EVAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"missing evaluation recording {path}")
    return path


def speech(name: str = "cmu_arctic_us_aew_a0001.wav", seconds: float | None = None) -> np.ndarray:
    x = read_48k(eval_file("speech", name))
    if seconds is not None:
        x = x[: int(seconds * 48_000)]
    return x / (np.max(np.abs(x)) + 1e-9) * 0.5


def noise(name: str = "running_tap.wav", seconds: float | None = None) -> np.ndarray:
    x = read_48k(eval_file("noise", name))
    if seconds is not None:
        x = x[: int(seconds * 48_000)]
    return x


class RunningServer:
    """A MediaServer behind its aiohttp app on 127.0.0.1 with an OS-chosen port."""

    def __init__(self, server: MediaServer, runner: web.AppRunner, port: int) -> None:
        self.server = server
        self.runner = runner
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    started: list[RunningServer] = []

    async def factory(config: ServerConfig | None = None, stages: tuple[str, ...] = ()) -> RunningServer:
        cfg = config or ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                                     enhance=replace(EnhanceConfig(), default_stages=stages, device="cpu"))
        server = MediaServer(cfg)
        runner = web.AppRunner(create_app(server))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        rs = RunningServer(server, runner, port)
        started.append(rs)
        return rs

    yield factory
    for rs in started:
        await rs.runner.cleanup()
    await asyncio.sleep(0)


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    return await start_server()


@pytest.fixture
def spans() -> Iterator[Any]:
    """The process's OTel SDK (as the entry point configures it, unless an earlier test did) with an in-memory
    span exporter for this test: ``spans.get_finished_spans()``."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from signaling.telemetry_setup import configure_telemetry

    setup = configure_telemetry({"OTEL_SERVICE_NAME": "mediaserver-test"})
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    if setup.tracer_provider is not None:
        setup.tracer_provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()
