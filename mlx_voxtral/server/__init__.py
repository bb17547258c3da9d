"""The OpenAI-compatible transcription server: ``mlx-voxtral serve`` or ``python -m mlx_voxtral.server``.

* ``app``: the Starlette routes (HTTP parsing, validation, OpenAI-shaped answers);
* ``engine``: the one thread that schedules and batches every request's model work.

``main`` loads the model once, then serves the app with uvicorn::

    python -m mlx_voxtral.server --model mistralai/Voxtral-Mini-4B-Realtime-2602 --port 1234
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from ..options import add_model_args, load_model

# the defaults, stated once (app.py holds them; it needs the serve extra to import)
MAX_AUDIO_SECONDS = 3600.0
LIVE_IDLE_TIMEOUT = 30.0
LIVE_BACKLOG_SECONDS = 30.0
BODY_TIMEOUT = 60.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible Voxtral Realtime transcription server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--api-key", default=os.environ.get("MLX_VOXTRAL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (websockets: or the subprotocol "
                        "openai-insecure-api-key.KEY, as the page at / sends it; default: $MLX_VOXTRAL_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot before 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: none)")
    p.add_argument("--allow-local-files", metavar="DIR", help="let audio_url read files inside DIR")
    p.add_argument("--allow-remote-urls", action="store_true", help="let audio_url fetch http(s) URLs")
    p.add_argument("--remote-domains", metavar="D,D", default="",
                   help="with --allow-remote-urls: only hosts on these domains (default: any public host)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="with --allow-remote-urls: also fetch from loopback, private and link-local addresses")
    p.add_argument("--fetch-timeout", type=float, default=30.0, help="seconds for a whole remote fetch")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest audio upload")
    p.add_argument("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS,
                   help="audio per request, summed over its parts (0: no limit)")
    p.add_argument("--max-live", type=int, default=None,
                   help="live websocket sessions at once (default: half of --max-concurrency)")
    p.add_argument("--live-idle-timeout", type=float, default=LIVE_IDLE_TIMEOUT,
                   help="seconds a live session may send nothing (0: no limit)")
    p.add_argument("--max-live-seconds", type=float, default=MAX_AUDIO_SECONDS,
                   help="audio per live session (0: no limit)")
    p.add_argument("--live-backlog-seconds", type=float, default=LIVE_BACKLOG_SECONDS,
                   help="live audio buffered ahead of the decoder before the socket stops being read")
    p.add_argument("--allowed-hosts", metavar="H,H", default="",
                   help="Host names served besides loopback ones ('*': any)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (https://app.example) that may open the websocket; repeatable")
    p.add_argument("--limit-concurrency", type=int, default=512,
                   help="open connections before uvicorn answers 503")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection lives")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                   help="seconds for a request's body to arrive (0: no limit)")
    p.add_argument("--served-model-name", help="model id in /v1/models and responses (default: --model)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Optional[list[str]] = None, prog: Optional[str] = "python -m mlx_voxtral.server") -> int:
    """Parse ``argv``, load the model and serve until interrupted. Returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    name = prog or "mlx_voxtral.server"
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--port", args.port)):
        if value < 1:
            print(f"{name}: error: {flag} must be positive", file=sys.stderr)
            return 2
    if args.max_queue < 0:
        print(f"{name}: error: --max-queue must be >= 0", file=sys.stderr)
        return 2
    if args.live_backlog_seconds < 1:
        print(f"{name}: error: --live-backlog-seconds must be at least 1", file=sys.stderr)
        return 2
    if args.max_live is not None and not 0 <= args.max_live <= args.max_concurrency:
        print(f"{name}: error: --max-live must be between 0 and --max-concurrency", file=sys.stderr)
        return 2
    if args.allow_local_files and not os.path.isdir(args.allow_local_files):
        print(f"{name}: error: --allow-local-files {args.allow_local_files} is not a folder", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from ..audio_url import SourcePolicy
        from .app import LOOPBACK_HOSTS, create_app
        from .protocol import uvicorn_settings
    except ImportError as e:
        print(f"{name}: error: {e.name} is missing; install the server extra: pip install 'mlx-voxtral[serve]'",
              file=sys.stderr)
        return 1

    from ..exceptions import VoxtralError

    try:
        model = load_model(args, quiet=True)
    except VoxtralError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    max_bytes = int(args.max_upload_mb * 1024 * 1024)
    policy = SourcePolicy(local_root=args.allow_local_files, allow_remote=args.allow_remote_urls,
                          max_bytes=max_bytes, timeout=args.fetch_timeout,
                          allowed_domains=tuple(d.strip() for d in args.remote_domains.split(",") if d.strip()),
                          allow_private_addresses=args.allow_private_urls)
    hosts = [*LOOPBACK_HOSTS, *(h.strip() for h in args.allowed_hosts.split(",") if h.strip())]
    if args.host not in WILDCARD_HOSTS:
        hosts.append(args.host)
    app = create_app(
        model,
        model_name=args.served_model_name or args.model,
        api_key=args.api_key or None,
        policy=policy,
        max_upload_bytes=max_bytes,
        max_audio_seconds=args.max_audio_seconds or None,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout or None,
        max_live=args.max_live,
        live_idle_timeout=args.live_idle_timeout or None,
        max_live_seconds=args.max_live_seconds or None,
        live_backlog_seconds=args.live_backlog_seconds,
        body_timeout=args.body_timeout or None,
        allowed_hosts=hosts,
        allow_ip_hosts=args.host in WILDCARD_HOSTS,
        allowed_origins=args.allow_origin,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    page_host = "127.0.0.1" if args.host in WILDCARD_HOSTS else f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger(__name__).info("live captions in the browser: http://%s:%d/", page_host, args.port)
    settings = uvicorn_settings(args.header_timeout, args.limit_concurrency, args.timeout_keep_alive)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  timeout_graceful_shutdown=10, **settings)).run()
    return 0


def create_app(*args, **kwargs):
    """``mlx_voxtral.server.app.create_app`` (needs the ``serve`` extra)."""
    from .app import create_app as make

    return make(*args, **kwargs)
