"""Settings of a media process's own runtime, made once at its entry point (not by a library import).

Both keep the event loop, and so the media clock, from pausing for work nobody asked for:

- ``avoid_huge_pages``: numpy asks the kernel for transparent huge pages (``madvise``) for every array of
  4 MiB or more.  The speech synthesizer, the quality scorer and the executor make such arrays all the
  time, and each first touch of a huge page is 2 MiB zeroed at once: on the 2-core development VM
  (``transparent_hugepage`` = madvise) a run of three attacks, prompts among them, made ~3600 of
  them, and the call of two participants had 50-110 ms gaps in half the attack suites
  (``bench/attack.py`` prompt-memory: the server's clock and the bots' loop late together); with
  them off, 0 huge page faults and 25-30 ms in every run.
- ``freeze_startup_heap``: a full collection of Python's cyclic garbage collector walks every tracked
  object while the loop waits (15-22 ms at the ~55-66k objects of a started server here); the objects
  of the imports and the models never become garbage, so they leave those walks.
"""

from __future__ import annotations

import gc
import os

HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"


def avoid_huge_pages() -> None:
    """No transparent huge pages for numpy's arrays here and in every process started after this
    (they read the environment when they import numpy); an operator's own setting is kept."""
    os.environ.setdefault(HUGEPAGE_ENV, "0")
    if os.environ[HUGEPAGE_ENV] == "0":  # this process imported numpy already: tell it directly
        import numpy as np

        core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 / numpy 1
        set_madvise = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
        if set_madvise is not None:
            set_madvise(False)

def freeze_startup_heap() -> None:
    """Take what the process holds once started (modules, models, the server) out of the cyclic collector.

    A full collection walks every tracked object while the event loop waits; those made at startup
    were walked each time.  Called once at an entry point after startup, never in a process that
    starts servers again and again (the tests).
    """
    gc.collect()
    gc.freeze()
