"""The executor's configuration: batching, deadlines, isolation, recovery, admission."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from enhancers.executor.recovery import RecoveryPolicy


@dataclass(frozen=True)
class ExecutorConfig:
    """How the executor batches and when it gives up on a chunk."""

    device: str = "auto"  # "auto": cuda if torch.cuda.is_available() else cpu; or "cpu"/"cuda"
    deadline_ms: float = 40.0  # per chunk: not back by then -> passes through unprocessed
    max_wait_ms: float = 3.0  # after a tick's first chunk, wait at most this long for the other streams
    torch_threads: int = 1  # torch.set_num_threads in the worker
    # A worker process ("process" isolation) lowers its nice value by this many steps below the media
    # process that feeds it, so that on a core both share a burst of the media process's own work (joins:
    # DTLS handshakes, session set-up) cannot make the batched round miss its deadline: the round wins the
    # core, and the media process, whose audio has a jitter buffer, waits a few milliseconds.  Needs
    # CAP_SYS_NICE (root, or docker's ``cap_add: [SYS_NICE]``); without it the worker runs at the media
    # process's priority, as with 0, and says so in its log and /healthz (``executor.worker.priority_boost``).
    priority_boost: int = 0
    stage_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # ctor kwargs per spec
    # A chunk answered unprocessed on deadline is still run later (results discarded) so stateful
    # stages (echo canceller, dereverb, denoisers) see a continuous signal; beyond this many chunks
    # waiting per stream the oldest are dropped: under overload, load is shed, not queued.
    max_backlog_chunks: int = 3
    # a job running longer is abandoned, the worker replaced and the stage it hung in disabled; counted from
    # when the worker starts running it, and not while the worker loads a stage (loading starves it), for at
    # most load_timeout_ms per load
    stuck_after_ms: float = 2000.0
    load_timeout_ms: float = 120_000.0
    # gc.freeze() at start and after each stage load: a full collection otherwise rescans every
    # object torch and the models created (~200k; measured 170 ms, stalling all audio) every few s.
    freeze_gc: bool = True
    # "thread": stages run on a thread of this process (light; shares the GIL with the event loop);
    # "process": in a worker process of their own (enhancers.executor.process), for servers;
    # "remote": in an executor service at ``remote_address`` ("host:port" or "unix:/path", authenticated
    # with ``remote_token``), shared with other media processes, with a local worker process as the
    # fallback while it is unreachable (enhancers.executor.remote).
    isolation: str = "thread"
    remote_address: str = ""
    remote_token: bytes = b""
    remote_name: str = "mediaserver"
    # a stage that hung or crashed the worker is disabled for 1, 2, 4 ... s (at most 60 s), then loaded
    # fresh; more than 5 faults in 5 minutes: disabled until restart (enhancers/executor/recovery.py)
    recovery: RecoveryPolicy = RecoveryPolicy()
    # Admission control (enhancers/executor/admission.py): a stream asking for stages gets them if the
    # predicted stage time per tick, with every stream already admitted, stays within target_load of the
    # 10 ms tick (headroom so deadlines hold); else the first lighter stage list of the ladder
    # (enhancers.registry LIGHTER, DEGRADE_STEPS; ``ladder`` replaces LIGHTER) that fits, else none.
    # Degraded streams are upgraded, at most every upgrade_interval_s, when the better list fits under
    # upgrade_load (hysteresis).  stage_costs: spec -> (fixed ms per call, ms per stream), the prior
    # and a floor under the measured cost.  Off by default (library, CLI); the server turns it on.
    admission: bool = False
    target_load: float = 0.55
    upgrade_load: float = 0.45
    upgrade_interval_s: float = 2.0
    stage_costs: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    ladder: Mapping[str, Sequence[str]] | None = None
    # When the worker shares its cores with the process that feeds it (``shared_cpus`` > 0: a media
    # server whose every usable core runs a media worker), the stages' time alone says nothing of the
    # CPU left: a stream is also admitted only if the predicted stage time plus the host's measured CPU
    # per tick (its process tree less the stages: enhancers/executor/host_cpu.py) plus
    # ``host_ms_per_stream`` for the newcomer (its decode, encode and
    # forwarding) stays within ``cpu_target`` of the ``shared_cpus`` cores (this media process's share:
    # 1.0 with one media worker per core, 0.5 with two).  0: the worker has cores of its own (or is
    # remote) and only ``target_load`` applies.
    shared_cpus: float = 0.0
    cpu_target: float = 0.9
    host_ms_per_stream: float = 0.25
