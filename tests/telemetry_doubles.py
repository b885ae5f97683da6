"""Test doubles for the telemetry tests: OTLP receivers and a lossy, jittery UDP relay.

``LossyRelay`` sits between a ``loadtest.bot.Bot`` and the server (``RelayedBot`` rewrites the
server's SDP candidates to point at it); ``Received`` / ``OtlpHttpReceiver`` decode what OTLP
exporters send.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiortc import RTCSessionDescription
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from loadtest.bot import Bot

RATE = 48_000


def _attr_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Received:
    """What an OTLP receiver decoded: spans (as dicts) and metric names."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.metric_names: set[str] = set()
        self.lock = threading.Lock()

    def add_traces(self, request: Any) -> None:
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({
                            "name": s.name, "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                            "attrs": {a.key: _attr_value(a.value) for a in s.attributes},
                            "events": [(e.name, {a.key: _attr_value(a.value) for a in e.attributes})
                                       for e in s.events],
                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano})

    def add_metrics(self, request: Any) -> None:
        with self.lock:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metric_names.update(m.name for m in sm.metrics)


class OtlpHttpReceiver:
    """A local OTLP/HTTP endpoint (stdlib server on a thread) decoding /v1/traces and /v1/metrics."""

    def __init__(self, received: Received) -> None:
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    received.add_traces(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    received.add_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- a lossy, jittery UDP relay between a bot and the server -----------------------------------------
def is_rtp(data: bytes) -> bool:
    """RTP (not RTCP, STUN or DTLS): version 2 and a payload type outside RTCP's 192-223 (RFC 5761)."""
    return len(data) >= 12 and 0x80 <= data[0] <= 0xBF and not 192 <= data[1] <= 223


class LossyRelay(asyncio.DatagramProtocol):
    """Forwards UDP between one bot and the server; drops and delays the bot's RTP packets.

    STUN, DTLS and RTCP pass untouched, both ways.  RTP packets are dropped with probability
    ``loss`` (seeded) and each remaining one is held for a uniform random delay.  The relay
    also measures what a receiver right behind it sees, with the receiver's own formulas: RFC
    3550 jitter of the packets as emitted, and lost = expected (from the first to the highest
    sequence number emitted) minus emitted.
    """

    def __init__(self, loss: float, max_delay_s: float, seed: int = 7) -> None:
        self.loss = loss
        self.max_delay_s = max_delay_s
        self.rng = random.Random(seed)
        self.transport: asyncio.DatagramTransport | None = None
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.frozen = False
        self.dropped = self.emitted = 0
        self._base = self._max = self._ref = -1
        self._transit: float | None = None
        self.jitter_samples = 0.0  # RFC 3550 estimator of the emitted packets, 48 kHz units
        self._last_delay: float | None = None
        self.added_jitter_s = 0.0  # the same estimator over the delays the relay itself added

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")  # type: ignore[no-any-return]

    def rewrite(self, sdp: str) -> str:
        """The server's SDP with one host candidate, pointing at the relay (the server's is the target)."""
        out = []
        for line in sdp.split("\r\n"):
            if line.startswith("a=candidate:"):
                f = line.split()
                ip, port, component, transport = f[4], int(f[5]), f[1], f[2].lower()
                if component != "1" or transport != "udp" or ":" in ip:
                    continue
                if self.server is None:
                    self.server = (ip, port)
                if (ip, port) != self.server:
                    continue
                f[4], f[5] = self.address[0], str(self.address[1])
                line = " ".join(f)
            out.append(line)
        return "\r\n".join(out)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.server:
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if self.server is None:
            return
        if not is_rtp(data):
            self.transport.sendto(data, self.server)
        elif not self.frozen:
            if self.rng.random() < self.loss:
                self.dropped += 1
                return
            delay = self.rng.uniform(0.0, self.max_delay_s)
            asyncio.get_running_loop().call_later(delay, self._emit, data, delay)

    def _emit(self, data: bytes, delay: float) -> None:
        if self.frozen or self.transport is None or self.server is None:
            return
        self.transport.sendto(data, self.server)
        now = time.monotonic()
        seq, ts = int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:8], "big")
        ext = seq if self._ref < 0 else self._ref + ((seq - self._ref + 0x8000) % 0x10000 - 0x8000)
        if self._base < 0:
            self._base = self._max = ext
        self._ref, self._max = ext, max(self._max, ext)
        self.emitted += 1
        transit = now * RATE - ts
        if self._transit is not None:
            d = abs(((transit - self._transit + 2**31) % 2**32) - 2**31)
            self.jitter_samples += (d - self.jitter_samples) / 16.0
        self._transit = transit
        if self._last_delay is not None:
            self.added_jitter_s += (abs(delay - self._last_delay) - self.added_jitter_s) / 16.0
        self._last_delay = delay

    @property
    def lost(self) -> int:
        return max(0, self._max - self._base + 1 - self.emitted) if self._base >= 0 else 0

    @property
    def jitter_s(self) -> float:
        return self.jitter_samples / RATE


class RelayedBot(Bot):
    """A Bot whose peer connection sends its media to the relay instead of the server's candidate."""

    def __init__(self, *args: Any, relay: LossyRelay, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        set_remote = self.pc.setRemoteDescription

        async def through_relay(desc: RTCSessionDescription) -> None:
            await set_remote(RTCSessionDescription(sdp=relay.rewrite(desc.sdp), type=desc.type))

        self.pc.setRemoteDescription = through_relay  # type: ignore[method-assign, assignment]
