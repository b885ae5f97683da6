"""Media telemetry end to end: real calls, a lossy UDP relay, real Prometheus, real OTLP receivers.

The process's OpenTelemetry SDK is configured once, as ``mediaserver serve`` does at its entry
point; ``GET /metrics`` serves its Prometheus reader, and an in-memory span processor added to
it collects the spans.  The OTLP exporters are checked against local gRPC and HTTP receivers.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from enhancers import registry
from loadtest.bot import Bot
from mediaserver.telemetry_instruments import Instruments
from signaling.telemetry_setup import TelemetrySetup, build_telemetry, configure_telemetry, otlp_settings
from tests.conftest import RunningServer, ServerFactory, speech
from tests.telemetry_doubles import LossyRelay, OtlpHttpReceiver, Received, RelayedBot

REPO = Path(__file__).resolve().parents[1]
RATE = 48_000


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
        # the per-stream instruments go through a provider of their own (GET /metrics renders them directly)
        assert setup.stream_meter_provider is not None
        streams = Instruments(MeterProvider().get_meter("unread"))
        streams.export_streams_on(setup.stream_meter_provider.get_meter("mediaserver"))
        tel = _telemetry_of_three_streams()
        streams.observe(tel)  # type: ignore[arg-type]
        setup.force_flush()
        assert [s["name"] for s in received.spans] == ["participant.session"]
        assert "mediaserver.test.calls" in received.metric_names
        assert {"mediaserver.stream.chunks", "mediaserver.stream.rtp.jitter"} <= received.metric_names
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


async def test_compose_stack_is_consistent_with_what_the_server_exports(start_server: ServerFactory,
                                                                        tmp_path: Path) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"node-a", "node-b", "executor", "redis", "otel-collector", "prometheus", "grafana", "jaeger"} <= set(services)
    build = services["node-a"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    mounted: dict[str, Path] = {}
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            path = _host_path(volume)
            assert path is not None and path.exists(), f"{name} mounts {volume}: missing in the repository"
            mounted[volume.split(":")[1]] = path
    env = services["node-a"]["environment"]
    assert env["MEDIASERVER_REDIS_URL"].startswith("redis://redis:") and env["MEDIASERVER_EXECUTOR_URL"].startswith(
        "executor:") and services["node-b"]["environment"]["MEDIASERVER_NODE_ID"] == "node-b"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317" and env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"

    collector = yaml.safe_load(mounted["/etc/otelcol-contrib/config.yaml"].read_text())
    assert set(collector["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert collector["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in services
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]
    prom = yaml.safe_load(mounted["/etc/prometheus/prometheus.yml"].read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"node-a:8080", "node-b:8080"} <= targets and all(t.split(":")[0] in services for t in targets)
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
    promtool = shutil.which("promtool")
    if promtool is not None:  # Debian's prometheus package ships it: real syntax checks
        rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr{i}", "expr": e}
                                                             for i, e in enumerate(exprs)]}]}
        (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
        for args in (["check", "config", str(mounted["/etc/prometheus/prometheus.yml"])],
                     ["check", "rules", str(tmp_path / "dashboard-rules.yml")]):
            proc = await asyncio.create_subprocess_exec(promtool, *args, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            assert proc.returncode == 0, out.decode()

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


def test_stream_families_render_as_the_sdk_exporter_renders_them() -> None:
    """GET /metrics renders the per-stream families itself (signaling/stream_metrics.py): the same text,
    line for line, as the OTel SDK's Prometheus reader gives for the same streams (names, units, help,
    types, label order and escaping, value format, series left out where a stream has no value)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    from mediaserver.telemetry_instruments import STREAM_METRICS
    from signaling.stream_metrics import StreamExposition

    tel = _telemetry_of_three_streams()
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)])
    sdk = Instruments(MeterProvider().get_meter("unread"))  # the process-wide families: not read here
    sdk.export_streams_on(provider.get_meter("mediaserver"))
    sdk.observe(tel)  # type: ignore[arg-type]
    try:
        sdk_text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    exposition = StreamExposition()
    names = {f.sample_name for f in exposition.families}
    assert len(names) == len(STREAM_METRICS)
    sdk_lines = [line for line in sdk_text.splitlines()
                 if re.split(r"[{ ]", line.removeprefix("# HELP ").removeprefix("# TYPE "))[0] in names]
    direct = exposition.render([tel]).splitlines()  # type: ignore[list-item]
    assert direct == sdk_lines
    assert any('room="standup \\"daily\\" \\\\ 9:30"' in line for line in direct)
    assert "mediaserver_stream_rtp_received_total" in " ".join(direct) and "1.234567e+06" in " ".join(direct)
    assert exposition.render([]) == ""


class _StreamsOnly:
    """What the per-stream instruments read of a MediaTelemetry: its streams (weakly referenced)."""

    def __init__(self, streams: dict[int, Any]) -> None:
        self.streams = streams


def _telemetry_of_three_streams() -> _StreamsOnly:
    """Three streams with label values to escape, a value in exponent form and series without a value."""
    from types import SimpleNamespace

    from mediaserver.fanout import Fanout
    from mediaserver.jitter import JitterStats
    from mediaserver.stream import StreamCounters
    from mediaserver.telemetry import StreamState

    span = SimpleNamespace(add_event=lambda *a, **k: None)
    streams = {}
    for i, (room, stages, source) in enumerate([
            ('standup "daily" \\ 9:30', ["vad", "aec"], SimpleNamespace(stats=JitterStats(received=1234567, lost=-2))),
            ("plain", [], SimpleNamespace()),  # no jitter buffer stats (a prompt track): those series left out
            ("ünïcode\nroom", ["denoise"], SimpleNamespace(stats=JitterStats(received=5, jitter_ms=3.25)))]):
        counters = StreamCounters(chunks=10_000 * i, bypassed=i, level_dbfs=-23.5, echo_delay_ms=12.0 if i == 0 else -1)
        stream = SimpleNamespace(id=f"p{i}-mic", owner_id=f"p{i}", kind="microphone", source=source,
                                 counters=counters, fanout=Fanout(), pipeline=SimpleNamespace(stages=stages))
        streams[i] = StreamState(stream, room, span)  # type: ignore[arg-type]
    streams[0].e2e_mean, streams[0].e2e_max = 0.0625, 1e-7
    return _StreamsOnly(streams)
