"""The name a worker process shows in ``top``, ``ps -o comm`` and ``/proc/PID/comm`` (Linux), and its tie
to its parent's life.

Every spawned child runs ``python -c "from multiprocessing.spawn import spawn_main ..."``; without
a name of its own an operator (and ``bench/soak.py``) cannot tell the executor's worker from the
quality scorer.  Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
