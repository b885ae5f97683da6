"""The executor's worker keeps its arithmetic on one thread: torch's pool and numpy's BLAS alike."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, numpy, torch
from threadpoolctl import threadpool_info
from enhancers.compute_threads import limit_compute_threads
before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
limit_compute_threads(1)
after = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({"before": before, "after": after, "torch": torch.get_num_threads()}))
"""


def test_one_thread_for_torch_and_for_numpys_blas() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["after"] and all(n == 1 for n in seen["after"]), seen  # numpy's OpenBLAS is there, and limited
    assert seen["torch"] == 1
