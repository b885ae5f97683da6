"""The name a worker process shows in ``top``, ``ps -o comm`` and ``/proc/PID/comm`` (Linux), its tie
to its parent's life, its scheduling priority, and what a spawned child imports when it starts.

Every spawned child runs ``python -c "from multiprocessing.spawn import spawn_main ..."``; without
a name of its own an operator (and ``bench/soak.py``) cannot tell the executor's worker from the
quality scorer.  Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
EXECUTOR_WORKER = "ms-executor"
QUALITY_SCORER = "ms-quality"
MEDIA_WORKER = "ms-worker"  # + its index: ms-worker0, ms-worker1 ... (signaling/cluster)


def _prctl(option: int, arg: object) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_process_name(name: str) -> None:
    """Set this process's short name (at most 15 bytes are kept)."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def die_with_parent(signal_number: int = 15) -> None:
    """Have the kernel send this process ``signal_number`` (SIGTERM) when its parent dies, however it dies
    (a front process killed with SIGKILL must not leave its media workers running)."""
    _prctl(PR_SET_PDEATHSIG, ctypes.c_int(signal_number))


def idle_priority() -> None:
    """Run the calling thread (and the threads it starts afterwards) only when its cores have nothing else
    to run: Linux ``SCHED_IDLE``, else the lowest nice; best effort.  A waking thread of normal priority
    preempts it at once.  For a process's main thread before it starts others, or a thread whose work runs
    outside the GIL (a C call through ctypes): a starved thread holding the GIL stalls its process."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except (AttributeError, OSError):
            pass


def raise_priority(steps: int) -> int:
    """Lower the nice value of every thread of this process by ``steps`` (threads started afterwards
    inherit it from the thread that starts them); best effort: it needs ``CAP_SYS_NICE`` or a high
    enough ``RLIMIT_NICE``.  Returns the steps actually gained (0 where not permitted or not Linux)."""
    if steps <= 0 or not hasattr(os, "setpriority"):
        return 0
    before = os.getpriority(os.PRIO_PROCESS, 0)
    target = max(-20, before - steps)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [threading.get_native_id()]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError:  # not permitted, or the thread has ended
            pass
    return before - os.getpriority(os.PRIO_PROCESS, 0)


def lower_priority(steps: int) -> None:
    """Raise the calling thread's nice value by ``steps`` (always permitted; best effort)."""
    if steps <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError:
        pass


def spawn_without_main() -> None:
    """Spawned children (the executor's worker, the quality scorer, media workers) stop running the parent's
    main script again.  multiprocessing's spawn starts a child by running the parent's ``__main__`` as
    ``__mp_main__``, and for a console script (``.venv/bin/mediaserver``) that imports the whole server: the
    quality scorer, which needs onnxruntime and numpy (0.1 s, 30 MB), took 2.9 s and 340 MB to start, and
    an executor worker restarted after a fault 1 s more than its stages need.  The children import only the
    modules of what they run (pickled by module name).  Call it from a console script's entry point, whose
    main script defines nothing a child runs; a script run with ``-m`` is left alone."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        return
    if hasattr(main, "__file__"):
        del main.__file__
