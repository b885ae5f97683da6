"""What the host costs on a shared core: the CPU per tick admission control adds to the stages' own.

When the executor's worker shares its cores with the media process that feeds it, a stream is admitted
only while the stages' predicted time plus the host's CPU fits ``cpu_target`` of those cores
(:mod:`enhancers.executor.admission`).  The host's CPU used to be the media process's own CPU time
(``process_time``).  But its children run on the same cores: the quality scorer (5 % of the core at 6
full-chain streams, 17 % while it loads its models), the prompt synthesizer, and the executor's worker
itself, whose CPU beyond the stages' timed calls (pipes, batching, the stage plumbing) no stage
prediction holds.  Measured with ``/proc/PID/schedstat`` at 6 full-chain streams on one core: the
worker ran 597 ms/s, the media process 271, the scorer 46, the core was 92 % busy where admission
believed 80 %, and the chunks waited for it: 1-20 % of them missed their 40 ms deadline.

A process at ``SCHED_IDLE`` is left out: the scorer runs so (``QualityConfig.scorer_idle``), and a tick
that wakes preempts it at once.  Niced 10 instead, it took 30-40 % of the core for 12 s while it loaded
its models and scored its first windows; counted, that read as 3 ms per tick more host cost and made
admission shed 4 of 6 full-chain streams it had held.

So the host's cost is the CPU time of the media process's whole tree (itself and its children, from
``/proc``) less what the stages' timed calls took (:meth:`HostCpu.add_stage_time`).  Other processes on
the same cores (other tenants; the bots of ``bench/capacity.py``) do not count: counting the cores' busy
time made admission refuse 7 of 8 full-chain streams on two cores where 8 held, since a burst of joins
(the bots' own start) stays in the mean.  Elsewhere than Linux the process's own CPU time stands in.
Either way the result is a running mean over ``mean_s`` seconds, sampled at most every half second.
"""

from __future__ import annotations

import os
import time

TICK_MS = 10.0
SAMPLE_S = 0.5  # /proc's CPU times count 10 ms jiffies: a shorter interval reads them too coarsely


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux: every thread's ``children`` list)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    found.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    except OSError:
        pass
    return found


SCHED_IDLE = getattr(os, "SCHED_IDLE", 5)  # the policy (in /proc/PID/stat) of a process that runs only on spare CPU


def _cpu_s(pid: int, hz: int) -> float:
    """User + system CPU seconds of process ``pid``: 0 when it is gone, or when it runs at ``SCHED_IDLE``
    (the quality scorer): a waking tick preempts it at once, so it takes none of the cores' time the
    media path and the stages need."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        if len(fields) > 38 and int(fields[38]) == SCHED_IDLE:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / hz
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu_s() -> float | None:
    """CPU seconds of this process and its children and grandchildren (None: no /proc)."""
    if not os.path.isdir("/proc/self/task"):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    pids = [me]
    for child in _children(me):
        pids.append(child)
        pids.extend(_children(child))
    return sum(_cpu_s(pid, hz) for pid in pids)


class HostCpu:
    """Owns the measurement of what the host costs on the shared cores per 10 ms tick (``ms``): its process
    tree's CPU time less the stages' own (:meth:`add_stage_time`), or else its own CPU time (``source``)."""

    def __init__(self, mean_s: float) -> None:
        self.mean_s = mean_s
        self.ms = 0.0
        self.source = "tree" if tree_cpu_s() is not None else "process"
        self._stage_s = 0.0  # stage CPU time reported so far
        # at the last sample: (monotonic, own process_time, the tree's CPU seconds, stage seconds)
        self._mark: tuple[float, float, float | None, float] | None = None

    def add_stage_time(self, seconds: float) -> None:
        """The executor's worker spent ``seconds`` of CPU in stages (already in the stages' prediction)."""
        self._stage_s += seconds

    def sample(self) -> None:
        """Update ``ms`` when half a second has passed since the last sample (cheap otherwise)."""
        now = time.monotonic()
        mark = self._mark
        if mark is not None and now - mark[0] < SAMPLE_S:
            return
        own = time.process_time()
        tree = tree_cpu_s() if self.source == "tree" else None
        if mark is not None:
            dt = now - mark[0]
            ms = (own - mark[1]) / dt * TICK_MS
            # a child that ended (a restarted worker) makes the tree's sum drop: that sample is its own only
            # (with the executor's worker a thread of this process, its own time holds the stages' too)
            if tree is not None and mark[2] is not None and tree >= mark[2]:
                ms = max(0.0, ((tree - mark[2]) - (self._stage_s - mark[3])) / dt * TICK_MS)
            # a running mean over ~mean_s: long enough that a burst of joins (DTLS handshakes, SDP) does not
            # read as what a stream costs for its life, short enough to follow streams joining (an
            # underestimate overloads the core, and every stream's chunks then miss their deadline)
            self.ms += min(1.0, dt / self.mean_s) * (ms - self.ms)
        self._mark = (now, own, tree, self._stage_s)
