"""Admin HTTP API of rollouts (mediaserver/rollout.py, docs/ROLLOUT.md).

| method, path | body | reply |
|---|---|---|
| ``POST /api/rollouts`` | ``{candidate, baseline?, rooms?, percent?, max_ovrl_drop?, ...}`` | 201, the rollout |
| ``GET /api/rollouts`` | | ``{current, history}`` |
| ``GET /api/rollouts/current`` | | the running (else the last) rollout; 404 ``no-rollout`` |
| ``POST /api/rollouts/current/promote`` | | the promoted rollout; 404 ``no-rollout`` |
| ``POST /api/rollouts/current/rollback`` | | the rolled back rollout; 404 ``no-rollout`` |

A rollout changes what runs on streams of any room and the scorer's budget: every call needs an
admin token for every room (``room: "*"``; any token in development mode).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mediaserver.rollout import RolloutManager
from mediaserver.room import RoomError

RequireAdmin = Callable[[web.Request, str], None]
ReadJson = Callable[[web.Request], Awaitable[dict[str, Any]]]


def add_routes(app: web.Application, manager: RolloutManager, require_admin: RequireAdmin,
               read_json: ReadJson) -> None:
    """The rollout endpoints of ``app``, on ``manager`` (the server's), behind ``require_admin``."""

    async def start(request: web.Request) -> web.Response:
        require_admin(request, "*")
        body = await read_json(request)
        rollout = await manager.start(body)
        return web.json_response(rollout.describe(), status=201)

    async def status(request: web.Request) -> web.Response:
        require_admin(request, "*")
        return web.json_response(manager.status())

    async def current(request: web.Request) -> web.Response:
        require_admin(request, "*")
        if manager.current is None:
            raise RoomError("no-rollout", "no rollout has run on this server", status=404)
        return web.json_response(manager.current.describe())

    async def promote(request: web.Request) -> web.Response:
        require_admin(request, "*")
        return web.json_response((await manager.promote()).describe())

    async def rollback(request: web.Request) -> web.Response:
        require_admin(request, "*")
        return web.json_response((await manager.rollback("command")).describe())

    app.router.add_post("/api/rollouts", start)
    app.router.add_get("/api/rollouts", status)
    app.router.add_get("/api/rollouts/current", current)
    app.router.add_post("/api/rollouts/current/promote", promote)
    app.router.add_post("/api/rollouts/current/rollback", rollback)
