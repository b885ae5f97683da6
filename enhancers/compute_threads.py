"""How many CPU threads a stage's arithmetic may use, in both pools a stage can reach.

Torch has its intra-op pool (``torch.set_num_threads``); numpy's matrix products
run in OpenBLAS, whose own pool starts with a thread per core.  The executor's
worker runs one round at a time on the thread that times it (admission control
budgets that thread's CPU time), so both pools get the same limit: a product
that fanned out to the other cores would take them from the media process
unseen and unbudgeted.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def limit_compute_threads(threads: int) -> None:
    """Limit torch's pool and the BLAS libraries loaded in this process to ``threads`` threads."""
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        log.warning("threadpoolctl is missing: numpy's BLAS keeps its default thread count")
        return
    threadpool_limits(limits=threads, user_api="blas")  # a call, not a context: the limit stays
