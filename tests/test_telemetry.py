"""Media telemetry end to end: real calls, a lossy UDP relay, real Prometheus, real OTLP receivers.

The process's OpenTelemetry SDK is configured once, as ``mediaserver serve`` does at its entry
point; ``GET /metrics`` serves its Prometheus reader, and an in-memory span processor added to
it collects the spans.  The OTLP exporters are checked against local gRPC and HTTP receivers.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiortc import RTCSessionDescription
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from enhancers import registry
from loadtest.bot import Bot
from signaling.telemetry_setup import TelemetrySetup, build_telemetry, configure_telemetry, otlp_settings
from tests.conftest import RunningServer, ServerFactory, speech

REPO = Path(__file__).resolve().parents[1]
RATE = 48_000


# -- OTLP receivers -----------------------------------------------------------------------------
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


@pytest.fixture(scope="module", autouse=True)
def otel() -> Iterator[tuple[TelemetrySetup, InMemorySpanExporter]]:
    """The process's SDK (configured here, as at the entry point, unless an earlier scrape did), plus
    an in-memory span processor for this module's checks."""
    setup = configure_telemetry({"OTEL_SERVICE_NAME": "mediaserver-test"})
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    if setup.tracer_provider is not None:
        setup.tracer_provider.add_span_processor(processor)
    yield setup, exporter
    processor.shutdown()  # the global providers stay: other modules scrape /metrics too


# -- helpers ------------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> tuple[Samples, str]:
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{url}/metrics")
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, text


def sample(samples: Samples, name: str, **labels: str) -> float:
    hits = [v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= lab]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
    return hits[0]


async def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


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


async def test_lossy_jittery_path_shows_in_loss_and_jitter_metrics(server: RunningServer) -> None:
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(lambda: LossyRelay(loss=0.05, max_delay_s=0.04),
                                                   local_addr=("127.0.0.1", 0))
    lossy = RelayedBot(server.url, "tel-loss", "lossy", speech(), relay=relay)
    direct = Bot(server.url, "tel-loss", "direct", speech("cmu_arctic_us_axb_a0004.wav"))
    await lossy.join()
    await direct.join()
    try:
        await wait_for(lambda: relay.emitted >= 250 and relay.dropped >= 10, timeout=30.0)
        relay.frozen = True  # nothing more reaches the server: its figures and the relay's now stand still
        await asyncio.sleep(0.5)
        samples, _ = await scrape(server.url)
        lossy_sid, direct_sid = f"{lossy.id}-mic", f"{direct.id}-mic"
        lost = sample(samples, "mediaserver_stream_rtp_lost", stream=lossy_sid)
        received = sample(samples, "mediaserver_stream_rtp_received_total", stream=lossy_sid)
        jitter = sample(samples, "mediaserver_stream_rtp_jitter_seconds", stream=lossy_sid)
        concealed = sample(samples, "mediaserver_stream_concealed_total", stream=lossy_sid)
        print(f"relay: dropped {relay.dropped}, emitted {relay.emitted}, lost as seen behind it {relay.lost}, "
              f"jitter {relay.jitter_s * 1e3:.1f} ms (added {relay.added_jitter_s * 1e3:.1f} ms); server: lost "
              f"{lost:.0f}, received {received:.0f}, jitter {jitter * 1e3:.1f} ms, concealed {concealed:.0f}")
        # loss: exactly what the relay did (every emitted packet arrived, none counted twice)
        assert received == relay.emitted
        assert abs(lost - relay.lost) <= 1, (lost, relay.lost)
        ratio = lost / (lost + received)
        assert 0.02 <= ratio <= 0.09, f"5 % dropped, server reports {ratio:.3f}"
        assert concealed >= lost, "every lost packet is concealed (PLC or FEC)"
        # jitter: what a receiver right behind the relay measures, within 30 % + 3 ms of server-side
        # scheduling noise; and at least the part the relay added itself (a uniform 0-40 ms delay: ~13 ms)
        assert abs(jitter - relay.jitter_s) <= 0.3 * relay.jitter_s + 0.003, (jitter, relay.jitter_s)
        assert jitter >= 0.7 * relay.added_jitter_s, (jitter, relay.added_jitter_s)
        # the direct participant on the same server lost nothing
        assert sample(samples, "mediaserver_stream_rtp_lost", stream=direct_sid) == 0
        # the other figures of the call are there with sane values
        assert sample(samples, "mediaserver_stream_subscribers", stream=lossy_sid) == 1
        assert sample(samples, "mediaserver_room_participants", room="tel-loss") == 2
        assert sample(samples, "mediaserver_latency_e2e_seconds_count", kind="microphone", stages="none") > 0
        assert sample(samples, "mediaserver_stream_jitter_buffer_target_seconds", stream=lossy_sid) >= 0.02
    finally:
        await lossy.leave()
        await direct.leave()
        relay.transport.close()  # type: ignore[union-attr]


# -- real Prometheus ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _prom_query(http: aiohttp.ClientSession, base: str, query: str) -> list[dict[str, Any]]:
    r = await http.get(f"{base}/api/v1/query", params={"query": query})
    body = await r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


async def test_prometheus_scrapes_the_call(server: RunningServer, tmp_path: Path) -> None:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.skip("prometheus is not installed (.ci/run installs the Debian package)")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "mediaserver", "scrape_interval": "1s",
                                  "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    a = Bot(server.url, "tel-prom", "alice", speech())
    b = Bot(server.url, "tel-prom", "bob", None, publish=False)
    await a.join()
    await b.join()
    base = f"http://127.0.0.1:{port}"
    try:
        sid = f"{a.id}-mic"
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 40.0
            jitter: list[dict[str, Any]] = []
            rate: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not (jitter and rate):
                await asyncio.sleep(1.0)
                try:
                    jitter = await _prom_query(http, base, f'mediaserver_stream_rtp_jitter_seconds{{stream="{sid}"}}')
                    rate = await _prom_query(http, base,
                                             f'increase(mediaserver_stream_rtp_received_total{{stream="{sid}"}}[5s])')
                except aiohttp.ClientError:
                    continue  # not listening yet
            assert jitter, f"Prometheus has no jitter series for {sid}"
            labels = jitter[0]["metric"]
            assert labels["job"] == "mediaserver" and labels["room"] == "tel-prom" and labels["participant"] == a.id
            assert 0.0 <= float(jitter[0]["value"][1]) < 1.0
            assert rate and float(rate[0]["value"][1]) > 0.0, rate  # the counter grows from scrape to scrape
            up = await _prom_query(http, base, 'up{job="mediaserver"}')
            assert up and up[0]["value"][1] == "1"
            lag = await _prom_query(http, base, "mediaserver_event_loop_lag_seconds_count")
            assert lag and float(lag[0]["value"][1]) >= 1
    finally:
        proc.terminate()
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), 10.0)
        except TimeoutError:
            proc.kill()
            output, _ = await proc.communicate()
        print("prometheus:", output.decode(errors="replace")[-2000:])
        await a.leave()
        await b.leave()


# -- spans -------------------------------------------------------------------------------------------
async def test_spans_per_session_track_and_prompt(server: RunningServer,
                                                  otel: tuple[TelemetrySetup, InMemorySpanExporter],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    setup, exporter = otel
    if setup.tracer_provider is None:
        pytest.skip("OTEL_SDK_DISABLED: no spans")
    monkeypatch.setitem(registry.STAGES, "limiter:raise", "tests.fault_stages:RaisingStage")
    a = Bot(server.url, "tel-trace", "alice", speech())
    b = Bot(server.url, "tel-trace", "bob", None, publish=False)
    await a.join()
    await b.join()
    try:
        await wait_for(lambda: len(b.recordings) == 1 and b.received_from(a.id).size > RATE)  # type: ignore[arg-type]
        await a.send({"type": "set-stages", "stages": "vad"})
        await asyncio.sleep(1.0)
        await a.send({"type": "set-stages", "stages": "limiter:raise"})  # every chunk bypasses: a failing stage
        await asyncio.sleep(2.5)
        prompt_id = await server.server.play_prompt("tel-trace", "Welcome.")
        await wait_for(lambda: any(e.get("prompt") == prompt_id for e in b.events_of("prompt.finished")), 30.0)
    finally:
        await a.leave()
        await b.leave()

    def ended(pid: str | None) -> bool:
        return any(s.name == "participant.session" and (s.attributes or {}).get("mediaserver.participant") == pid
                   for s in exporter.get_finished_spans())

    await wait_for(lambda: ended(a.id) and ended(b.id), 10.0)  # the server handles the leaves
    spans = [{"name": s.name, "span_id": s.context.span_id, "parent": s.parent.span_id if s.parent else None,
              "attrs": dict(s.attributes or {}), "events": [(e.name, dict(e.attributes or {})) for e in s.events],
              "start": s.start_time, "end": s.end_time}
             for s in exporter.get_finished_spans() if (s.attributes or {}).get("mediaserver.room") == "tel-trace"]
    by_id = {s["span_id"]: s for s in spans}
    sessions = {s["attrs"]["mediaserver.participant"]: s for s in spans if s["name"] == "participant.session"}
    assert {a.id, b.id} <= set(sessions)
    assert all(sessions[p]["attrs"]["mediaserver.leave_reason"] == "left" for p in (a.id, b.id))
    assert any(name == "renegotiation" for name, _ in sessions[b.id]["events"])  # alice's track arrived

    track = next(s for s in spans if s["name"] == "track" and s["attrs"]["mediaserver.stream"] == f"{a.id}-mic")
    assert by_id[track["parent"]] is sessions[a.id]
    changes = [attrs["mediaserver.stages"] for name, attrs in track["events"] if name == "stages.changed"]
    assert changes == ["vad", "limiter:raise"]
    bypassed = sum(attrs["mediaserver.chunks"] for name, attrs in track["events"] if name == "bypass")
    assert bypassed > 50, track["events"]
    assert track["attrs"]["mediaserver.rtp.received"] > 100 and track["attrs"]["mediaserver.bypassed"] >= bypassed

    prompt = next(s for s in spans if s["name"] == "prompt" and s["attrs"]["mediaserver.prompt"] == prompt_id)
    assert by_id[prompt["parent"]]["name"] == "prompt.track"
    assert [name for name, _ in prompt["events"]] == ["synthesized", "prompt.started"]
    assert prompt["attrs"]["mediaserver.prompt.interrupted"] is False
    played = (prompt["end"] - prompt["start"]) / 1e9
    assert played >= prompt["attrs"]["mediaserver.prompt.duration_s"] * 0.9, "the span covers the playback"
    assert len(spans) <= 6, "sessions, tracks and prompts only: never a span per frame"


# -- exporter selection from OTEL_* variables; OTLP over gRPC ------------------------------------------------
def test_otlp_settings_follow_the_standard_variables() -> None:
    assert otlp_settings({}, "TRACES") is None
    assert otlp_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "TRACES") == \
        ("http/protobuf", "http://c:4318/v1/traces")
    assert otlp_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
                         "METRICS") == ("grpc", "http://c:4317")
    assert otlp_settings({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9/x",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "METRICS") == ("http/protobuf", "http://m:9/x")
    with pytest.raises(ValueError):
        otlp_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "TRACES")
    quiet = build_telemetry({})  # no endpoint: Prometheus only, spans dropped, no network
    assert quiet.metric_exporters == ["prometheus"] and quiet.span_exporters == []
    quiet.shutdown()
    off = build_telemetry({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert off.meter_provider is None and off.render_prometheus() is None
    none = build_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXPORTER": "none",
                            "OTEL_TRACES_EXPORTER": "none"})
    assert none.metric_exporters == ["prometheus"] and none.span_exporters == []
    none.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_exports_spans_and_metrics(protocol: str) -> None:
    """The exporters chosen from OTEL_* really deliver, to a local OTLP receiver of that protocol."""
    received = Received()
    grpc_server: Any = None
    http_receiver: OtlpHttpReceiver | None = None
    if protocol == "grpc":

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                received.add_traces(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                received.add_metrics(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), grpc_server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), grpc_server)
        endpoint = f"http://127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
        grpc_server.start()
    else:
        http_receiver = OtlpHttpReceiver(received)
        endpoint = http_receiver.url
    setup = build_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                             "OTEL_METRIC_EXPORT_INTERVAL": "600000"})
    try:
        suffix = "" if protocol == "grpc" else "/v1/traces"
        assert setup.span_exporters == [f"otlp/{protocol} {endpoint}{suffix}"]
        assert setup.tracer_provider is not None and setup.meter_provider is not None
        setup.tracer_provider.get_tracer("t").start_span("participant.session").end()
        setup.meter_provider.get_meter("t").create_counter("mediaserver.test.calls").add(3)
        setup.force_flush()
        assert [s["name"] for s in received.spans] == ["participant.session"]
        assert "mediaserver.test.calls" in received.metric_names
    finally:
        setup.shutdown()
        if grpc_server is not None:
            grpc_server.stop(None)
        if http_receiver is not None:
            http_receiver.close()


# -- the docker-compose stack -----------------------------------------------------------------------------------
def _host_path(volume: str) -> Path | None:
    source = volume.split(":", 1)[0]
    return REPO / source if source.startswith(".") else None


async def test_compose_stack_is_consistent_with_what_the_server_exports(start_server: ServerFactory) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mediaserver", "otel-collector", "prometheus", "grafana", "jaeger"} <= set(services)
    build = services["mediaserver"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    mounted: dict[str, Path] = {}
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            path = _host_path(volume)
            assert path is not None and path.exists(), f"{name} mounts {volume}: missing in the repository"
            mounted[volume.split(":")[1]] = path
    env = services["mediaserver"]["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317" and env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"

    collector = yaml.safe_load(mounted["/etc/otelcol-contrib/config.yaml"].read_text())
    assert set(collector["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert collector["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in services
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]
    prom = yaml.safe_load(mounted["/etc/prometheus/prometheus.yml"].read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert "mediaserver:8080" in targets and all(t.split(":")[0] in services for t in targets)
    provisioning = mounted["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "datasources.yaml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources}
    assert all(re.match(r"http://([a-z-]+):", d["url"]).group(1) in services for d in datasources)  # type: ignore[union-attr]
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((mounted["/var/lib/grafana/dashboards"] / "mediaserver.json").read_text())

    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])} <= uids
    used = {m for e in exprs for m in re.findall(r"\bmediaserver_[A-Za-z0-9_]+", e)}

    rs = await start_server(stages=("vad",))  # a stage: executor and VAD series exist
    a = Bot(rs.url, "tel-compose", "alice", speech())
    b = Bot(rs.url, "tel-compose", "bob", speech("cmu_arctic_us_axb_a0004.wav"))
    await a.join()
    await b.join()
    try:
        await wait_for(lambda: b.received_from(a.id).size > RATE and a.received_from(b.id).size > RATE)  # type: ignore[arg-type]
        await asyncio.sleep(2.2)  # two sampler ticks: the histograms have samples
        samples, text = await scrape(rs.url)
    finally:
        await a.leave()
        await b.leave()
    families = re.findall(r"^# TYPE (\S+)", text, re.MULTILINE)
    assert len(families) == len(set(families)), "two instruments map to one Prometheus name"
    exported = {name for name, _ in samples}
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries series the server does not export: {missing}"


def test_stream_metrics_cost_nothing_per_frame() -> None:
    """The per-packet hook is plain arithmetic; OTel recording happens in the once-a-second sampler."""
    from mediaserver.fanout import EncodedPacket
    from mediaserver.telemetry import SendLatency

    hook = SendLatency()
    now = time.monotonic()
    for delay in (0.05, 0.07, 0.06):
        hook(EncodedPacket(data=b"x", pts=0, origin=now - delay))
    hook(EncodedPacket(data=b"x", pts=0, origin=None))  # prompt audio with no RTP origin is skipped
    count, total, peak = hook.take()
    assert count == 3 and 0.18 <= total < 0.25 and 0.07 <= peak < 0.1
    assert hook.take()[0] == 0 and hook.last is not None
