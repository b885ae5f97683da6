"""Server configuration: frozen dataclasses built once at the entry point.

Sources, later ones winning: built-in defaults, environment variables
(``MEDIASERVER_*``), command-line options.  Everything below the entry point
receives these objects; nothing else reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

from enhancers.executor.recovery import RecoveryPolicy


@dataclass(frozen=True)
class MediaConfig:
    """RTP/codec settings of the forwarding path."""

    opus_bitrate: int = 32_000  # per published stream, mono voice
    # Encoder complexity (0-10) of streams the server re-encodes (those with stages): the full one while the
    # event loop's core has room, the lighter one while it is busy (mediaserver/encoder_load.py); equal
    # values keep it fixed
    opus_complexity: int = 5
    opus_complexity_under_load: int = 1
    opus_light_above: float = 0.8  # busy share of the loop's core (run + run-queue wait) that switches to light
    opus_full_below: float = 0.6  # ... and, held for 5 s, back to full
    jitter_min_ms: float = 20.0
    jitter_max_ms: float = 200.0
    jitter_start_ms: float = 40.0
    subscriber_queue_packets: int = 5  # 100 ms: a slow subscriber drops older packets
    # subscriber packets written to the socket by the fan-out (mediaserver/rtp_send.py), not by one aiortc
    # send task per subscriber; "0" in MEDIASERVER_DIRECT_RTP_SEND turns it off (for A/B measurements)
    direct_rtp_send: bool = True
    # streams without stages forward the publisher's Opus packets instead of decoding and re-encoding them
    forward_unprocessed: bool = True
    ice_servers: tuple[str, ...] = ()  # e.g. ("stun:stun.example.org:3478",); none on a LAN


@dataclass(frozen=True)
class EnhanceConfig:
    """The enhancement executor and the stages rooms get by default."""

    default_stages: tuple[str, ...] = ("vad", "limiter")
    device: str = "auto"  # auto: cuda when present, else cpu
    deadline_ms: float = 40.0
    max_wait_ms: float = 3.0
    torch_threads: int = 1
    # "process": stages run in a worker process of their own, off the event loop's GIL (servers);
    # "thread": on a thread of the server process (no second process; small deployments, debugging)
    isolation: str = "process"
    # an executor service shared with other media processes (enhancers serve-executor: a GPU host, say):
    # "host:port" or "unix:/path" and its token; stages then run there, with a local worker process as
    # the fallback while it is unreachable ("" : the process's own executor, as ``isolation`` says)
    executor_url: str = ""
    executor_token: str = field(default="", repr=False)
    # a stage that hung or crashed the worker: backoff and give-up thresholds (enhancers/executor/recovery.py)
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    # Admission control (enhancers/executor/admission.py): a stream gets the stages it asks for if the
    # predicted stage time per 10 ms tick, with the streams already admitted, stays within target_load
    # of the tick; else a lighter stage list (enhancers.registry LIGHTER, DEGRADE_STEPS), else none (its
    # audio is forwarded as it came).  Degraded streams are upgraded when the better list fits under
    # upgrade_load, checked every upgrade_interval_s.  stage_costs: (spec, fixed ms per batched call,
    # ms per stream) declared costs, the prior and a floor under what the executor measures.
    admission: bool = True
    target_load: float = 0.55
    upgrade_load: float = 0.45
    upgrade_interval_s: float = 2.0
    stage_costs: tuple[tuple[str, float, float], ...] = ()
    # When the executor's worker shares its cores with the media process(es) (every usable core runs a
    # media worker: ``shared_cpus`` -1 finds that out at start, as this process's share of them; 0: never;
    # x: x cores, e.g. 0.5 for one of two media workers on a core), a stream is also
    # admitted only while stages + the media process tree's measured CPU + host_ms_per_stream for the
    # newcomer stay within cpu_target of those cores (enhancers/executor/admission.py; at most 0.8 while
    # the worker runs at the media process's priority: worker_priority_boost 0, or no CAP_SYS_NICE).
    shared_cpus: float = -1.0
    cpu_target: float = 0.9
    host_ms_per_stream: float = 0.25
    # the executor's worker process runs this many nice steps ahead of the media process (needs
    # CAP_SYS_NICE; enhancers/executor/config.py): a burst of joins then delays the media loop by a few
    # milliseconds instead of making every stream's chunks miss their deadline; 0: the same priority
    worker_priority_boost: int = 5


@dataclass(frozen=True)
class PromptConfig:
    """Memory bounds of spoken prompts (mediaserver/prompts.py, synth/cache.py), in audio bytes:
    one 5000-character prompt is minutes of 48 kHz float32 audio (tens of MiB)."""

    cache_memory_bytes: int = 32 * 1024 * 1024  # the synthesis cache's memory LRU (entries over a quarter: not kept)
    max_queued_bytes: int = 32 * 1024 * 1024  # audio one prompt track holds, playing and queued (16-bit)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what any client may make the server hold or do."""

    max_rooms: int = 200
    max_participants_per_room: int = 50
    max_ws_message_bytes: int = 64 * 1024
    max_sdp_bytes: int = 32 * 1024
    max_ws_messages_per_second: float = 50.0
    max_ws_burst: int = 100
    max_connections_per_address: int = 32
    # signaling WebSockets of the whole process, all addresses together; the next handshake gets HTTP 503
    # ``server-busy`` (each one holds a socket, a task and its buffers)
    max_connections: int = 1000
    # TCP connections to the HTTP port in all (signaling, API, page, half-open requests); beyond it the
    # connection is answered 503 ``server-busy`` and closed at once (signaling/main.py)
    max_http_connections: int = 2000
    # new TCP connections to the HTTP port a second (token bucket, ``new_connection_burst`` at once); the
    # one beyond is answered 503 ``server-busy`` at once, unparsed: the handshakes share the media clock's
    # event loop (a flood of 1000 WebSocket handshakes in a second cost the call 14 frames)
    new_connections_per_s: float = 200.0
    new_connection_burst: int = 100
    # a request's line and headers must arrive within this long of the connection (or of the previous
    # request on a keep-alive connection), else the connection is closed (slowloris); signaling/main.py
    http_header_timeout_s: float = 5.0
    # a JSON request body must arrive within this long once the handler reads it: 408 ``timeout``
    http_body_timeout_s: float = 5.0
    # a WebSocket that has not joined a room within this long (of connecting or of its ``leave``) gets
    # ``join-timeout`` and is closed (1008)
    join_timeout_s: float = 10.0
    # messages a WebSocket may send before its ``join`` succeeds (pings and refused joins included); the
    # one beyond gets ``not-joined`` and the socket is closed (1008)
    max_messages_before_join: int = 20
    # refused (rate-limited) messages one WebSocket may send within ``ws_flood_window_s`` before it is
    # closed (1008); only the first refusal of a window gets a ``rate-limited`` reply, refusals are not parsed
    ws_flood_close_after: int = 200
    ws_flood_window_s: float = 10.0
    # an address with more than ``abuse_closes`` such policy closes (flood, no join, join deadline) within
    # ``abuse_cooldown_s`` has its next handshakes refused for ``abuse_cooldown_s`` (HTTP 429 ``cooling-down``)
    abuse_closes: int = 8
    abuse_cooldown_s: float = 10.0
    # a joined WebRTC participant that has not sent its ``offer`` within this long gets ``offer-timeout``
    # and is removed (reason ``no offer``); 0: off
    offer_timeout_s: float = 15.0
    # a join gets ``server-busy`` (503) when one more participant would take the media loop's busy share
    # over ``join_busy_limit`` (predicted from the last readings, mediaserver/loop_load.py), or while the
    # media clock skipped at least ``join_skipped_ticks`` of its ticks in each of the last seconds (its core
    # is full), so those already in lose nothing; never below join_min_participants on the process;
    # either above 1: that rule off
    join_busy_limit: float = 0.9
    join_skipped_ticks: float = 0.01
    join_min_participants: int = 8
    max_name_length: int = 64
    negotiation_timeout_s: float = 15.0
    # a WebRTC participant whose client sent nothing authenticated (ICE consent check, SRTP, SRTCP) for
    # this long is removed even though its WebSocket is open (mediaserver/liveness.py); 0: off.  Live
    # clients send a consent check every ~5 s (RFC 7675), so keep it well above that.
    peer_timeout_s: float = 15.0
    # datagrams at a participant's media ports (mediaserver/transport_guard.py), screened before any
    # parsing: longer ones are dropped (no SRTP/DTLS datagram of a 1500-byte MTU path is longer)
    media_max_datagram_bytes: int = 1500
    # per source address that is a remote ICE candidate / check-list pair (a live call sends ~55/s)
    media_packets_per_second: float = 500.0
    media_packet_burst: int = 250
    # any other source may only send STUN (ICE checks from addresses not signaled yet), this much
    media_stun_per_second: float = 50.0
    media_stun_burst: int = 50
    # datagrams waiting for the DTLS/SRTP receive loop of one connection; beyond: dropped
    media_receive_queue_packets: int = 256
    # SO_RCVBUF of each ICE socket (the kernel caps it at net.core.rmem_max; 0: the OS default, ~208 KiB):
    # room for a flood's datagrams while the event loop is busy, so the call's own are not lost with them
    media_socket_receive_bytes: int = 1 << 20


@dataclass(frozen=True)
class AuthConfig:
    """Join-token checking.  Development mode grants everything without tokens: local use only."""

    dev_mode: bool = False
    secret: Optional[str] = None


@dataclass(frozen=True)
class SipConfig:
    """The SIP/IVR bridge (signaling/sip, docs/SIP.md): dial plan, prompts, ports, who may call, flood limits."""

    room_prefix: str = "room-"  # sip:room-<name>@host joins room <name> directly
    menu_users: tuple[str, ...] = ("ivr", "menu", "conference", "")  # these users hear the spoken menu
    dial_plan: tuple[tuple[str, str], ...] = ()  # (request-URI user or menu digits, room id)
    digits_name_rooms: bool = True  # menu digits not in the dial plan name the room itself ("1234")
    menu_text: str = "Welcome. Enter the room number followed by the pound key."
    invalid_text: str = "Sorry, that room is not available."
    goodbye_text: str = "Goodbye."
    menu_attempts: int = 3
    digit_timeout_s: float = 8.0
    rtp_port_min: int = 20000
    rtp_port_max: int = 20999
    max_calls: int = 100
    call_rate: float = 10.0  # new calls per second, sustained
    call_burst: int = 20
    media_timeout_s: float = 60.0  # hang up when no RTP arrives for this long (not on hold)
    public_address: Optional[str] = None  # address in SDP/Contact; default: the interface facing the caller
    # -- access control (signaling/sip/auth.py, docs/SIP.md "Authentication") --
    # None: callers must authenticate unless the server runs in development mode; True/False: always/never
    require_auth: Optional[bool] = None
    # digest users (RFC 8760 SHA-256 and RFC 2617 MD5, qop=auth): (name, password, rooms); rooms ("*",) = any
    users: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=(), repr=False)  # repr: no passwords
    trusted_networks: tuple[str, ...] = ()  # source networks (trunks, an SBC) that skip authentication
    realm: str = "mediaserver"
    # offered in this order (RFC 8760: preferred first); phones that only read the first challenge and know
    # only MD5 (sipp, older desk phones) need ("MD5", "SHA-256") or ("MD5",)
    digest_algorithms: tuple[str, ...] = ("SHA-256", "MD5")
    nonce_ttl_s: float = 300.0  # a challenge's nonce is good this long; then 401 stale=true
    # -- flood limits --
    # SIP messages of any kind from one IP address, checked before parsing; beyond, dropped unanswered
    # (trusted networks exempt)
    messages_per_source: float = 200.0
    message_burst_per_source: int = 400
    invite_rate_per_source: float = 5.0  # new INVITEs per second from one IP address (before any other work)
    invite_burst_per_source: int = 10
    max_calls_per_room: int = 16  # phone calls in one room (also counted against max_participants_per_room)
    # phone joins into one room are spaced this far apart: a burst of answered calls renegotiates every
    # WebRTC participant of the room once per call, so a burst would stall the room's audio
    room_join_interval_s: float = 0.25
    max_tcp_per_source: int = 16  # TCP connections from one IP address
    max_tcp_connections: int = 256  # in all; at the cap the oldest idle connection without a call is closed
    tcp_first_request_s: float = 10.0  # a connection must complete its first request within this long
    tcp_idle_s: float = 120.0  # a connection without a call that sends nothing for this long is closed


@dataclass(frozen=True)
class QualityConfig:
    """Live audio quality SLIs (mediaserver/quality.py): sampling, scorer and metric cardinality."""

    enabled: bool = True
    # DNSMOS windows (before and after enhancement) for the whole server: the scorer process may spend
    # cpu_share of one core (a token bucket of CPU seconds holding burst_s seconds' worth), streams get
    # windows in a fair order (mediaserver/quality_budget.py), none more often than every period_s
    cpu_share: float = 0.02
    burst_s: float = 60.0
    period_s: float = 30.0
    score_timeout_s: float = 120.0  # a batch the scorer process has not answered by then: process replaced
    window_s: float = 4.0  # length of a window, whole seconds
    first_window_s: float = 1.0  # the first window starts this long after the stream (jitter buffer settled)
    # after a stream's stage set changes, its audio counts as unsettled this long (chunks in flight ran the
    # old set, fresh stage states warm up): no window takes it
    settle_s: float = 1.0
    max_pending: int = 8  # windows waiting for the scorer; beyond, the oldest is dropped (counted)
    max_queued_blocks: int = 512  # 1 s blocks of audio waiting for the scorer thread; beyond, dropped (counted)
    threads: int = 1  # ONNX Runtime intra-op threads of the scorer
    nice: int = 10  # the scorer thread's nice increment (Linux), so the media path wins the CPU
    # the scorer process at SCHED_IDLE (Linux; else at ``nice``): it runs only on CPU the media path and the
    # executor leave, and admission control on a shared core does not count it as the host's cost
    scorer_idle: bool = True
    per_stream_metrics: bool = False  # /metrics: per-stream gauges too (else per room and stage set only)
    # intelligibility SLI (mediaserver/quality_wer.py): every wer_every-th window of a stream whose stages change
    # its audio also gets the WER of Whisper tiny.en on "after" against "before", in the scorer process and its
    # budget; 0: off. Windows whose input holds fewer than wer_min_words words get none.
    wer_every: int = 0
    wer_min_words: int = 3


@dataclass(frozen=True)
class RolloutConfig:
    """Defaults of a canary / A/B rollout (mediaserver/rollout.py); a rollout request may override each."""

    max_ovrl_drop: float = 0.1  # MOS: the candidate may lose at most this much OVRL gain against the baseline
    alpha: float = 0.05  # false-rollback rate of the quality test over the whole rollout (anytime-valid)
    min_windows: int = 5  # scored windows per arm before the quality test may decide
    sd_floor: float = 0.1  # MOS: floor of each arm's per-window standard deviation in the test
    max_latency_increase_ms: float = 40.0  # guard: candidate mean end-to-end latency over the baseline's
    max_bypassed: float = 0.02  # guard: candidate share of bypassed chunks over the baseline's (and > 2x it)
    max_cpu_ratio: float = 4.0  # guard: candidate stage CPU per stream over the baseline's (0: not checked)
    guard_min_s: float = 10.0  # seconds of samples of both arms before a guard may decide
    auto_rollback: bool = True
    scoring_cpu_share: float = 0.1  # the DNSMOS budget while a rollout runs (QualityConfig.cpu_share otherwise)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the process needs, built once by ``load_config``."""

    host: str = "127.0.0.1"
    port: int = 8080
    sip_port: Optional[int] = None
    log_level: str = "INFO"
    # media worker processes (signaling/cluster/): 1 runs everything in this process; N > 1 puts rooms on N
    # worker processes behind a front process that owns the public port (0: one per CPU core)
    workers: int = 1
    # with workers: a room's participants on one worker beyond which its next joins go to another worker,
    # the room then spanning workers (its streams relayed between them); 0: a room stays on one worker
    room_spill_after: int = 0
    # with workers: worker i runs on the i-th usable core only (its executor worker too), when there are
    # at least as many usable cores as workers (MEDIASERVER_PIN_WORKERS=0: let the kernel move them)
    pin_workers: bool = True
    # a cluster of nodes (signaling/cluster/nodes.py): the Redis that holds the node registry, room owners
    # and the room bus ("" : this server alone); this node's id, the URL other nodes reach its public port
    # at, the token nodes prove to each other when one proxies a participant to another, and the address
    # the workers' relay sockets bind and announce (other nodes send streams there)
    redis_url: str = ""
    node_id: str = ""
    public_url: str = ""
    cluster_token: str = field(default="", repr=False)
    relay_host: str = "127.0.0.1"
    media: MediaConfig = field(default_factory=MediaConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _default_stages(value: str) -> tuple[str, ...]:
    """Rooms' default stages from the command line or the environment: specs checked as a client's are
    (``ValueError`` for an unknown one, before the server starts), ``none`` or nothing for no stages."""
    if value.strip().lower() == "none":
        return ()
    from enhancers.registry import check_stage_specs

    return tuple(s.spec for s in check_stage_specs(value))


def _sip_from_env(env: Mapping[str, str]) -> SipConfig:
    """sip: MEDIASERVER_SIP_DIAL_PLAN ("5000=standup,9=lobby"), _RTP_PORTS ("20000-20999"), _MAX_CALLS,
    _PUBLIC_ADDRESS, _USERS ("alice:secret:standup|lobby,trunk:pw"), _USERS_FILE (one such entry a line),
    _TRUSTED ("10.0.0.0/8,127.0.0.1/32"), _DIGEST_ALGORITHMS ("SHA-256,MD5"), _REQUIRE_AUTH,
    _MAX_CALLS_PER_ROOM."""
    sip = SipConfig()
    if env.get("MEDIASERVER_SIP_DIAL_PLAN"):
        pairs = [p.split("=", 1) for p in _split(env["MEDIASERVER_SIP_DIAL_PLAN"])]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("MEDIASERVER_SIP_DIAL_PLAN is a list of user=room")
        sip = replace(sip, dial_plan=tuple((u.strip(), r.strip()) for u, r in pairs))
    if env.get("MEDIASERVER_SIP_RTP_PORTS"):
        low, _, high = env["MEDIASERVER_SIP_RTP_PORTS"].partition("-")
        sip = replace(sip, rtp_port_min=int(low), rtp_port_max=int(high))
    if env.get("MEDIASERVER_SIP_MAX_CALLS"):
        sip = replace(sip, max_calls=int(env["MEDIASERVER_SIP_MAX_CALLS"]))
    if env.get("MEDIASERVER_SIP_PUBLIC_ADDRESS"):
        sip = replace(sip, public_address=env["MEDIASERVER_SIP_PUBLIC_ADDRESS"])
    users = list(_parse_sip_users(_split(env.get("MEDIASERVER_SIP_USERS", ""))))
    if env.get("MEDIASERVER_SIP_USERS_FILE"):
        with open(env["MEDIASERVER_SIP_USERS_FILE"], encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        users += _parse_sip_users(lines)
    if users:
        sip = replace(sip, users=tuple(users))
    if env.get("MEDIASERVER_SIP_TRUSTED"):
        import ipaddress

        nets = _split(env["MEDIASERVER_SIP_TRUSTED"])
        for net in nets:
            ipaddress.ip_network(net, strict=False)  # ValueError: a bad configuration, said at start
        sip = replace(sip, trusted_networks=nets)
    if env.get("MEDIASERVER_SIP_DIGEST_ALGORITHMS"):
        algorithms = tuple(a.upper() for a in _split(env["MEDIASERVER_SIP_DIGEST_ALGORITHMS"]))
        if not algorithms or any(a not in ("SHA-256", "MD5") for a in algorithms):
            raise ValueError("MEDIASERVER_SIP_DIGEST_ALGORITHMS is a list of SHA-256 and MD5")
        sip = replace(sip, digest_algorithms=algorithms)
    if env.get("MEDIASERVER_SIP_REQUIRE_AUTH"):
        sip = replace(sip, require_auth=env["MEDIASERVER_SIP_REQUIRE_AUTH"].lower() in ("1", "true", "yes"))
    if env.get("MEDIASERVER_SIP_MAX_CALLS_PER_ROOM"):
        sip = replace(sip, max_calls_per_room=int(env["MEDIASERVER_SIP_MAX_CALLS_PER_ROOM"]))
    return sip


def _parse_sip_users(entries: list[str] | tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...]]]:
    """``user:password`` (any room) or ``user:password:room1|room2``; a password with ':' needs the rooms."""
    users = []
    for entry in entries:
        name, sep, rest = entry.partition(":")
        if not sep or not name.strip() or not rest:
            raise ValueError("MEDIASERVER_SIP_USERS is a list of user:password[:room1|room2]")
        password, rooms = (rest.rsplit(":", 1) + ["*"])[:2] if ":" in rest else (rest, "*")
        if not password:
            raise ValueError(f"SIP user {name.strip()!r} has an empty password")
        users.append((name.strip(), password, tuple(r.strip() for r in rooms.split("|") if r.strip()) or ("*",)))
    return users


def parse_workers(value: object) -> int:
    """``--workers``: a count >= 1, or ``auto``/``0`` for one per CPU core this process may use."""
    text = str(value).strip().lower()
    if text in ("auto", "0"):
        return 0
    n = int(text)
    if n < 0 or n > 256:
        raise ValueError("workers is 'auto' or a count from 1 to 256")
    return n


def parse_wer_every(text: str) -> int:
    """``MEDIASERVER_QUALITY_WER``: ``1``/``on``/``true``/``yes`` every window, ``k`` every k-th, ``0``/``off``: none."""
    text = text.strip().lower()
    if text in ("on", "true", "yes"):
        return 1
    if text in ("off", "false", "no", ""):
        return 0
    n = int(text)
    if n < 0:
        raise ValueError("MEDIASERVER_QUALITY_WER is on, off or a window count k >= 0")
    return n


def worker_count(config: ServerConfig) -> int:
    """How many media worker processes ``config`` asks for (``workers=0``: one per usable core)."""
    if config.workers > 0:
        return config.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def load_config(env: Mapping[str, str] | None = None, **overrides: object) -> ServerConfig:
    """Build the configuration from ``env`` (default: os.environ) and explicit overrides."""
    env = os.environ if env is None else env
    cfg = ServerConfig()
    media = cfg.media
    enhance = cfg.enhance
    limits = cfg.limits
    if "MEDIASERVER_HOST" in env:
        cfg = replace(cfg, host=env["MEDIASERVER_HOST"])
    if "MEDIASERVER_PORT" in env:
        cfg = replace(cfg, port=int(env["MEDIASERVER_PORT"]))
    if env.get("MEDIASERVER_SIP_PORT"):
        cfg = replace(cfg, sip_port=int(env["MEDIASERVER_SIP_PORT"]))
    if env.get("MEDIASERVER_WORKERS"):
        cfg = replace(cfg, workers=parse_workers(env["MEDIASERVER_WORKERS"]))
    if env.get("MEDIASERVER_REDIS_URL"):
        cfg = replace(cfg, redis_url=env["MEDIASERVER_REDIS_URL"])
    if env.get("MEDIASERVER_NODE_ID"):
        cfg = replace(cfg, node_id=env["MEDIASERVER_NODE_ID"])
    if env.get("MEDIASERVER_PUBLIC_URL"):
        cfg = replace(cfg, public_url=env["MEDIASERVER_PUBLIC_URL"].rstrip("/"))
    if env.get("MEDIASERVER_CLUSTER_TOKEN"):
        cfg = replace(cfg, cluster_token=env["MEDIASERVER_CLUSTER_TOKEN"])
    if env.get("MEDIASERVER_RELAY_HOST"):
        cfg = replace(cfg, relay_host=env["MEDIASERVER_RELAY_HOST"])
    if env.get("MEDIASERVER_PIN_WORKERS"):
        cfg = replace(cfg, pin_workers=env["MEDIASERVER_PIN_WORKERS"].strip().lower() not in ("0", "false", "no", "off"))
    if env.get("MEDIASERVER_ROOM_SPILL_AFTER"):
        cfg = replace(cfg, room_spill_after=max(0, int(env["MEDIASERVER_ROOM_SPILL_AFTER"])))
    if "MEDIASERVER_LOG_LEVEL" in env:
        cfg = replace(cfg, log_level=env["MEDIASERVER_LOG_LEVEL"].upper())
    if "MEDIASERVER_OPUS_BITRATE" in env:
        media = replace(media, opus_bitrate=int(env["MEDIASERVER_OPUS_BITRATE"]))
    if "MEDIASERVER_JOIN_BUSY_LIMIT" in env:
        limits = replace(limits, join_busy_limit=float(env["MEDIASERVER_JOIN_BUSY_LIMIT"]))
    if "MEDIASERVER_JOIN_MIN_PARTICIPANTS" in env:
        limits = replace(limits, join_min_participants=max(0, int(env["MEDIASERVER_JOIN_MIN_PARTICIPANTS"])))
    if "MEDIASERVER_JOIN_SKIPPED_TICKS" in env:
        limits = replace(limits, join_skipped_ticks=float(env["MEDIASERVER_JOIN_SKIPPED_TICKS"]))
    if "MEDIASERVER_OPUS_COMPLEXITY" in env:
        media = replace(media, opus_complexity=int(env["MEDIASERVER_OPUS_COMPLEXITY"]))
    if "MEDIASERVER_OPUS_COMPLEXITY_UNDER_LOAD" in env:
        media = replace(media, opus_complexity_under_load=int(env["MEDIASERVER_OPUS_COMPLEXITY_UNDER_LOAD"]))
    if "MEDIASERVER_DIRECT_RTP_SEND" in env:
        media = replace(media, direct_rtp_send=env["MEDIASERVER_DIRECT_RTP_SEND"] not in ("0", "false", "no"))
    if "MEDIASERVER_FORWARD_UNPROCESSED" in env:
        media = replace(media, forward_unprocessed=env["MEDIASERVER_FORWARD_UNPROCESSED"] not in ("0", "false", "no"))
    if "MEDIASERVER_ICE_SERVERS" in env:
        media = replace(media, ice_servers=_split(env["MEDIASERVER_ICE_SERVERS"]))
    if "MEDIASERVER_STAGES" in env:
        enhance = replace(enhance, default_stages=_default_stages(env["MEDIASERVER_STAGES"]))
    if "MEDIASERVER_DEVICE" in env:
        enhance = replace(enhance, device=env["MEDIASERVER_DEVICE"])
    if "MEDIASERVER_EXECUTOR_PRIORITY_BOOST" in env:
        enhance = replace(enhance, worker_priority_boost=int(env["MEDIASERVER_EXECUTOR_PRIORITY_BOOST"]))
    if "MEDIASERVER_EXECUTOR_CPU_TARGET" in env:
        enhance = replace(enhance, cpu_target=float(env["MEDIASERVER_EXECUTOR_CPU_TARGET"]))
        if not 0.0 < enhance.cpu_target <= 1.0:
            raise ValueError("MEDIASERVER_EXECUTOR_CPU_TARGET must be in (0, 1]")
    if "MEDIASERVER_EXECUTOR" in env:
        enhance = replace(enhance, isolation=env["MEDIASERVER_EXECUTOR"])
    if env.get("MEDIASERVER_EXECUTOR_URL"):
        if not env.get("MEDIASERVER_EXECUTOR_TOKEN"):
            raise ValueError("MEDIASERVER_EXECUTOR_URL needs MEDIASERVER_EXECUTOR_TOKEN (the service's token)")
        enhance = replace(enhance, executor_url=env["MEDIASERVER_EXECUTOR_URL"],
                          executor_token=env["MEDIASERVER_EXECUTOR_TOKEN"])
    if "MEDIASERVER_DEADLINE_MS" in env:
        enhance = replace(enhance, deadline_ms=float(env["MEDIASERVER_DEADLINE_MS"]))
    if "MEDIASERVER_MAX_ROOMS" in env:
        limits = replace(limits, max_rooms=int(env["MEDIASERVER_MAX_ROOMS"]))
    if "MEDIASERVER_MAX_PARTICIPANTS" in env:
        limits = replace(limits, max_participants_per_room=int(env["MEDIASERVER_MAX_PARTICIPANTS"]))
    if "MEDIASERVER_PEER_TIMEOUT_S" in env:
        limits = replace(limits, peer_timeout_s=float(env["MEDIASERVER_PEER_TIMEOUT_S"]))
    quality = cfg.quality
    if "MEDIASERVER_QUALITY" in env:
        quality = replace(quality, enabled=env["MEDIASERVER_QUALITY"] not in ("0", "false", "no"))
    if "MEDIASERVER_QUALITY_PERIOD_S" in env:
        quality = replace(quality, period_s=float(env["MEDIASERVER_QUALITY_PERIOD_S"]))
    if "MEDIASERVER_QUALITY_CPU_SHARE" in env:
        quality = replace(quality, cpu_share=float(env["MEDIASERVER_QUALITY_CPU_SHARE"]))
    if "MEDIASERVER_QUALITY_SCORER_IDLE" in env:
        quality = replace(quality, scorer_idle=env["MEDIASERVER_QUALITY_SCORER_IDLE"] not in ("0", "false", "no"))
    if "MEDIASERVER_QUALITY_PER_STREAM_METRICS" in env:
        quality = replace(quality, per_stream_metrics=env["MEDIASERVER_QUALITY_PER_STREAM_METRICS"] in ("1", "true", "yes"))
    if env.get("MEDIASERVER_QUALITY_WER"):  # on/1: every window with stages; a number k: every k-th; 0/off
        quality = replace(quality, wer_every=parse_wer_every(env["MEDIASERVER_QUALITY_WER"]))
    auth = cfg.auth
    if env.get("MEDIASERVER_AUTH_SECRET"):
        auth = replace(auth, secret=env["MEDIASERVER_AUTH_SECRET"])
    if env.get("MEDIASERVER_DEV", "").lower() in ("1", "true", "yes"):
        auth = replace(auth, dev_mode=True)
    if overrides.get("dev"):
        auth = replace(auth, dev_mode=True)
    if overrides.get("auth_secret"):
        auth = replace(auth, secret=str(overrides["auth_secret"]))
    if not auth.dev_mode and not auth.secret:
        raise ValueError("set MEDIASERVER_AUTH_SECRET (signed join tokens) or run with --dev "
                         "(development mode: no tokens, local use only)")
    cfg = replace(cfg, media=media, enhance=enhance, limits=limits, auth=auth, sip=_sip_from_env(env),
                  quality=quality)
    top = {k: v for k, v in overrides.items() if v is not None and k in ServerConfig.__dataclass_fields__}
    cfg = replace(cfg, **top)  # type: ignore[arg-type]
    if "stages" in overrides and overrides["stages"] is not None:
        cfg = replace(cfg, enhance=replace(cfg.enhance, default_stages=_default_stages(str(overrides["stages"]))))
    if "device" in overrides and overrides["device"] is not None:
        cfg = replace(cfg, enhance=replace(cfg.enhance, device=str(overrides["device"])))
    return cfg
