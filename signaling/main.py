"""Entry point of the ``mediaserver`` command: read configuration once, run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from enhancers.process_name import spawn_without_main
from mediaserver.config import ServerConfig, load_config, parse_workers, worker_count
from mediaserver.process_setup import avoid_huge_pages, freeze_startup_heap
from mediaserver.server import VERSION, MediaServer
from signaling import rollout_cli
from signaling.app import create_app
from signaling.http_server import install_uvloop, start_http
from signaling.telemetry_setup import configure_telemetry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediaserver", description="WebRTC SFU with server-side audio enhancement")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to bind (env MEDIASERVER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP/WebSocket port (env MEDIASERVER_PORT, default 8080)")
    serve.add_argument("--sip-port", type=int, help="UDP port of the SIP bridge (env MEDIASERVER_SIP_PORT)")
    serve.add_argument("--stages", help="default stages of new rooms, e.g. 'vad,limiter', or 'none' (env MEDIASERVER_STAGES)")
    serve.add_argument("--device", help="enhancement device: auto, cpu or cuda (env MEDIASERVER_DEVICE)")
    serve.add_argument("--workers", help="media worker processes: a count, or 'auto' for one per CPU core; "
                                         "1 (the default) runs everything in one process (env MEDIASERVER_WORKERS)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (env MEDIASERVER_LOG_LEVEL)")
    serve.add_argument("--dev", action="store_true",
                       help="development mode: no join tokens needed, everyone is admin (env MEDIASERVER_DEV=1); "
                            "local use only")
    serve.add_argument("--auth-secret", help="HMAC secret for join tokens (env MEDIASERVER_AUTH_SECRET)")
    token = sub.add_parser("token", help="create a signed join token")
    token.add_argument("--room", required=True, help="room id, or '*' for every room")
    token.add_argument("--identity", required=True, help="who the token is for")
    token.add_argument("--name", help="display name")
    token.add_argument("--admin", action="store_true", help="add the admin permission")
    token.add_argument("--listen-only", action="store_true", help="subscribe only, no publishing")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    token.add_argument("--secret", help="signing secret (default: env MEDIASERVER_AUTH_SECRET)")
    rollout_cli.add_parser(sub)  # rollout: start|status|promote|rollback over the HTTP API
    return parser


async def _serve_until_signal(app: web.Application, config: ServerConfig) -> None:
    runner, _ = await start_http(app, config.host, config.port, config.limits)
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown: drain participants (signaling/app.py)


def serve(config: ServerConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_uvloop()
    avoid_huge_pages()  # before any child process starts: they inherit it
    try:  # telemetry: the OTel SDK, once, from the OTEL_* variables (signaling/telemetry_setup.py)
        telemetry = configure_telemetry(service_version=VERSION)
    except ValueError as exc:
        raise SystemExit(f"mediaserver: bad telemetry configuration: {exc}") from exc
    print(f"mediaserver: open http://{'localhost' if config.host in ('0.0.0.0', '::') else config.host}"
          f":{config.port}/ in two browser tabs", flush=True)
    if worker_count(config) > 1 or config.redis_url:  # media workers behind this process (signaling/cluster)
        from signaling.cluster.front import serve_front

        try:
            asyncio.run(serve_front(config))
        finally:
            telemetry.shutdown()
        return
    server = MediaServer(config)
    app = create_app(server)
    try:
        asyncio.run(_serve_until_signal(app, config))
    finally:
        telemetry.shutdown()  # telemetry: flush spans and metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spawn_without_main()
    if args.command == "rollout":
        return rollout_cli.run(args)
    if args.command == "token":
        import os

        from mediaserver.auth import create_token

        secret = args.secret or os.environ.get("MEDIASERVER_AUTH_SECRET")
        if not secret:
            print("mediaserver token: give --secret or set MEDIASERVER_AUTH_SECRET", file=sys.stderr)
            return 2
        perms = ["subscribe"] if args.listen_only else ["publish", "subscribe"]
        if args.admin:
            perms.append("admin")
        print(create_token(secret, room=args.room, identity=args.identity, permissions=tuple(perms),
                           ttl_s=args.ttl, name=args.name))
        return 0
    if args.command == "serve":
        try:
            config = load_config(host=args.host, port=args.port, sip_port=args.sip_port,
                                 log_level=args.log_level.upper() if args.log_level else None,
                                 stages=args.stages, device=args.device, dev=args.dev,
                                 auth_secret=args.auth_secret,
                                 workers=parse_workers(args.workers) if args.workers is not None else None)
        except ValueError as exc:
            print(f"mediaserver: bad configuration: {exc}", file=sys.stderr)
            return 2
        serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
