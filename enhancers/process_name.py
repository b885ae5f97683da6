"""The name a worker process shows in ``top``, ``ps -o comm`` and ``/proc/PID/comm`` (Linux).

Every spawned child runs ``python -c "from multiprocessing.spawn import spawn_main ..."``; without
a name of its own an operator (and ``bench/soak.py``) cannot tell the executor's worker from the
quality scorer.  Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_NAME = 15
EXECUTOR_WORKER = "ms-executor"
QUALITY_SCORER = "ms-quality"


def set_process_name(name: str) -> None:
    """Set this process's short name (at most 15 bytes are kept)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
