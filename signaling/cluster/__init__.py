"""Many media worker processes behind one public port (``mediaserver serve --workers N``).

A *front* process owns the public HTTP/WebSocket port, the browser page and
the connection limits; it places each room on one of N *worker* processes
(each a whole ``MediaServer`` with its own media clock, UDP media ports and
enhancement executor, serving the same app on a private Unix socket) and
proxies each participant's signaling WebSocket to the worker of its room
after reading its ``join``.  HTTP API requests about a room go to the room's
worker; lists, ``/healthz`` and ``/metrics`` gather every worker's.

| module | owns |
|---|---|
| ``pool.py`` | ``WorkerPool``: the worker processes (start, health, restart) and ``Placement`` (room -> worker) |
| ``worker_main.py`` | a worker process's main: the server on its Unix socket, its room bus client |
| ``proxy.py`` | ``SignalingProxy``: one client WebSocket, routed to its room's worker and pumped both ways |
| ``front.py`` | the front's aiohttp application: page, proxy, routed and gathered HTTP API |
| ``bus.py`` | ``RoomBusHub``: the room bus of rooms that span workers (events, streams, relay peers) |
| ``prometheus.py`` | merging the workers' Prometheus expositions under a ``worker`` label |
"""
