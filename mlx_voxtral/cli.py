"""The ``mlx-voxtral`` command (also ``python -m mlx_voxtral``).

    mlx-voxtral transcribe FILE... [--model M] [--quantize 4|8] [--delay-ms N]
                                   [--format txt|json|srt|vtt] [--output-dir D]
    mlx-voxtral listen [--from-file FILE]      live transcription (microphone or a file at real-time pace)
    mlx-voxtral serve ...                      the OpenAI-compatible server
    mlx-voxtral convert ...                    write a quantized MLX checkpoint
    mlx-voxtral bench ...                      the benchmark

User mistakes (missing files, bad flags, a folder that is not a checkpoint) print one line
and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .exceptions import VoxtralError
from .options import add_model_args, load_model
from .writers import FORMATS

PROG = "mlx-voxtral"


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delay-ms", type=int, default=None,
                        help="transcription delay, a multiple of 80 from 80 to 2400 (default: 480)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")


def _transcribe(args) -> int:
    from tqdm import tqdm

    from .generate import transcribe
    from .writers import render

    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise VoxtralError(f"no such file: {', '.join(missing)}")
    if args.output_dir is not None:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args)
    failed = 0
    for path in args.files:
        bar = tqdm(desc=Path(path).name, unit="s", disable=args.quiet or None, leave=False,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}]")

        def progress(done: float, total: Optional[float]) -> None:
            if total and bar.total != round(total):
                bar.total = round(total)
            bar.n = round(done) if not total else min(round(done), round(total))
            bar.refresh()

        try:
            result = transcribe(model, path, delay_ms=args.delay_ms, temperature=args.temperature,
                                max_tokens=args.max_tokens, progress=progress)
        except VoxtralError as e:
            bar.close()
            print(f"{PROG}: error: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        bar.close()
        text = render(result, args.format)
        if args.output_dir is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            target = out_dir / f"{Path(path).stem}.{args.format}"
            target.write_text(text, encoding="utf-8")
            if not args.quiet:
                print(f"{path} -> {target} ({result.audio_duration:.1f} s of audio, "
                      f"RTFx {result.rtfx:.2f})", file=sys.stderr)
    return 1 if failed else 0


def _listen(args) -> int:
    from .listen import listen

    model = load_model(args)
    return listen(model, from_file=args.from_file, delay_ms=args.delay_ms, temperature=args.temperature,
                  device=args.device, speed=args.speed, show_words=args.words)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Voxtral Realtime speech recognition on MLX.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("transcribe", help="transcribe audio files", description="Transcribe audio files.")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, mp3, m4a, ogg, webm, ...)")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many text tokens")
    p.add_argument("--format", choices=FORMATS, default="txt", help="output format (default: txt)")
    p.add_argument("--output-dir", default=None,
                   help="write FILE's transcript to DIR/<name>.<format> (default: print to stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    p.set_defaults(run=_transcribe)

    p = sub.add_parser("listen", help="live transcription from the microphone",
                       description="Print text as it is spoken (microphone, or a file at real-time pace).")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--from-file", default=None, metavar="FILE",
                   help="stream FILE at real-time pace instead of the microphone")
    p.add_argument("--speed", type=float, default=1.0,
                   help="with --from-file: pace relative to real time (0 = as fast as possible)")
    p.add_argument("--device", default=None, help="sounddevice input device (name or index)")
    p.add_argument("--words", action="store_true", help="also print each word with its start/end time")
    p.set_defaults(run=_listen)

    for name, help_text in (("serve", "run the OpenAI-compatible server"),
                            ("convert", "convert a checkpoint to a quantized MLX folder"),
                            ("bench", "run the benchmark")):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # serve/convert/bench own their flags: hand everything after the name over as is
    if argv and argv[0] in ("serve", "convert", "bench"):
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VoxtralError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _delegate(command: str, argv: list[str]) -> int:
    prog = f"{PROG} {command}"
    try:
        if command == "serve":
            from .server import main as serve_main

            return serve_main(argv, prog=prog) or 0
        if command == "convert":
            from .convert import main as convert_main

            return convert_main(argv, prog=prog) or 0
        from .bench import main as bench_main

        return bench_main(argv) or 0
    except VoxtralError as e:
        print(f"{PROG} {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
