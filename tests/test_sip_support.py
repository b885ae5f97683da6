"""Helpers of the SIP bridge tests (no tests here): a server with the bridge on, real UAs as subprocesses.

``sipp`` and ``baresip`` run as asyncio subprocesses so that the server, which
lives in the test's event loop, keeps serving while they run.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig, SipConfig
from signaling.app import SIP_KEY
from signaling.sip.server import SipEndpoint
from tests.conftest import RunningServer, ServerFactory

SCENARIOS = Path(__file__).resolve().parent / "sip_scenarios"
SIPP = shutil.which("sipp")
BARESIP = shutil.which("baresip")
SOX = shutil.which("sox")

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (Debian package sip-tester)")
needs_baresip = pytest.mark.skipif(BARESIP is None, reason="baresip is not installed (Debian package baresip)")


@dataclass
class SipServer:
    """A running server with its SIP endpoint."""

    running: RunningServer
    sip: SipEndpoint

    @property
    def port(self) -> int:
        return self.sip.port


def sip_config(**sip: object) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, sip_port=0, auth=AuthConfig(dev_mode=True),
                        enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"),
                        sip=replace(SipConfig(), **sip))  # type: ignore[arg-type]


async def start_sip_server(start_server: ServerFactory, **sip: object) -> SipServer:
    running = await start_server(sip_config(**sip))
    return SipServer(running, running.runner.app[SIP_KEY])


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(0.05)


@dataclass
class SippResult:
    rc: int
    output: str
    errors: str


async def run_sipp(scenario: str, port: int, service: str, workdir: Path, *, calls: int = 1,
                   rate: float | None = None, duration_ms: int | None = None, media_port: int = 6000,
                   timeout_s: float = 30.0) -> SippResult:
    """Run one sipp scenario against 127.0.0.1:``port``; sipp's exit status 0 means every call passed."""
    assert SIPP is not None
    args = [SIPP, f"127.0.0.1:{port}", "-sf", str(SCENARIOS / scenario), "-s", service, "-i", "127.0.0.1",
            "-mi", "127.0.0.1", "-mp", str(media_port), "-p", str(free_port()), "-m", str(calls), "-nostdin",
            "-timeout", f"{int(timeout_s)}s", "-trace_err", "-error_file", str(workdir / f"{scenario}.errors")]
    if rate is not None:
        args += ["-r", str(rate), "-rp", "1000"]
    if duration_ms is not None:
        args += ["-d", str(duration_ms)]
    proc = await asyncio.create_subprocess_exec(*args, cwd=workdir, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s + 10)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    errors_file = workdir / f"{scenario}.errors"
    errors = errors_file.read_text(errors="replace") if errors_file.exists() else ""
    return SippResult(proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace"), errors)


def telephone_band(x: np.ndarray) -> np.ndarray:
    """``x`` (48 kHz) as a phone can carry it: through 8 kHz and back.

    A -100 dBFS dither keeps digital silence out of the reference, where the
    normalized correlation of ``content_match`` would divide by zero.
    """
    band = resample_poly(resample_poly(np.asarray(x, dtype=np.float64), 1, 6), 6, 1)
    dither = np.random.default_rng(0).standard_normal(len(band)) * 1e-5
    return (band + dither).astype(np.float32)


def write_ulaw(path: Path, audio_48k: np.ndarray) -> None:
    """Raw µ-law at 8 kHz for sipp's rtp_stream, encoded by sox when present (an independent encoder)."""
    import soundfile as sf

    pcm8k = resample_poly(audio_48k, 1, 6).astype(np.float32)
    if SOX is not None:
        wav = path.with_suffix(".src.wav")
        sf.write(wav, pcm8k, 8000, subtype="PCM_16")
        import subprocess

        subprocess.run([SOX, str(wav), "-t", "raw", "-e", "u-law", "-r", "8000", "-c", "1", str(path)], check=True)
    else:
        from signaling.sip.g711 import PCMU

        path.write_bytes(PCMU.encode(pcm8k))
