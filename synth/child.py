"""The synthesis process's entry point: ``python -m synth.child FD`` (started by :mod:`synth.process`).

``FD`` is the child's end of a socket pair.  The parent sends its ``sys.path`` first (so that the engine
factory unpickles here as it would there), then the :class:`~synth.process.ChildSettings`; then
:func:`synth.process.child_main` answers requests until the socket closes.  Nothing else of the media
server is imported here.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def main(argv: list[str]) -> None:
    conn = Connection(int(argv[1]))
    paths = conn.recv()
    sys.path[:] = list(paths) + [p for p in sys.path if p not in paths]
    from synth.process import child_main

    child_main(conn, conn.recv())


if __name__ == "__main__":
    main(sys.argv)
