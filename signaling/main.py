"""Entry point of the ``mediaserver`` command: read configuration once, run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from aiohttp import web

from mediaserver.config import ServerConfig, load_config
from mediaserver.server import MediaServer
from signaling.app import create_app


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediaserver", description="WebRTC SFU with server-side audio enhancement")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to bind (env MEDIASERVER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP/WebSocket port (env MEDIASERVER_PORT, default 8080)")
    serve.add_argument("--sip-port", type=int, help="UDP port of the SIP bridge (env MEDIASERVER_SIP_PORT)")
    serve.add_argument("--stages", help="default stages of new rooms, e.g. 'vad,limiter' (env MEDIASERVER_STAGES)")
    serve.add_argument("--device", help="enhancement device: auto, cpu or cuda (env MEDIASERVER_DEVICE)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (env MEDIASERVER_LOG_LEVEL)")
    return parser


def serve(config: ServerConfig) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _install_uvloop()
    server = MediaServer(config)
    app = create_app(server)
    print(f"mediaserver: open http://{'localhost' if config.host in ('0.0.0.0', '::') else config.host}"
          f":{config.port}/ in two browser tabs", flush=True)
    web.run_app(app, host=config.host, port=config.port, print=None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = load_config(host=args.host, port=args.port, sip_port=args.sip_port,
                                 log_level=args.log_level.upper() if args.log_level else None,
                                 stages=args.stages, device=args.device)
        except ValueError as exc:
            print(f"mediaserver: bad configuration: {exc}", file=sys.stderr)
            return 2
        serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
