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


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible Voxtral Realtime transcription server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--api-key", default=os.environ.get("MLX_VOXTRAL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MLX_VOXTRAL_API_KEY)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot before 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: none)")
    p.add_argument("--allow-local-files", metavar="DIR", help="let audio_url read files inside DIR")
    p.add_argument("--allow-remote-urls", action="store_true", help="let audio_url fetch http(s) URLs")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest audio upload")
    p.add_argument("--max-audio-seconds", type=float, default=None, help="longest audio accepted")
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
    if args.allow_local_files and not os.path.isdir(args.allow_local_files):
        print(f"{name}: error: --allow-local-files {args.allow_local_files} is not a folder", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from ..audio_url import SourcePolicy
        from .app import create_app
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
                          max_bytes=max_bytes)
    app = create_app(
        model,
        model_name=args.served_model_name or args.model,
        api_key=args.api_key or None,
        policy=policy,
        max_upload_bytes=max_bytes,
        max_audio_seconds=args.max_audio_seconds,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout or None,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                 timeout_graceful_shutdown=10)).run()
    return 0


def create_app(*args, **kwargs):
    """``mlx_voxtral.server.app.create_app`` (needs the ``serve`` extra)."""
    from .app import create_app as make

    return make(*args, **kwargs)
