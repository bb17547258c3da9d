"""The ``mlx-voxtral`` command (also ``python -m mlx_voxtral``).

    mlx-voxtral transcribe INPUT... [--model M] [--quantize BITS] [--delay-ms N]
                                    [--format txt|json|srt|vtt] [--output-dir D] [--resume]
                                    (INPUT: a file, a folder, a glob or @list.txt; run it under
                                    ``mlx.launch`` to share an archive out among processes)
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
from .archive import LOG_NAME
from .options import add_model_args, load_model
from .writers import FORMATS, render

PROG = "mlx-voxtral"


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delay-ms", type=int, default=None,
                        help="transcription delay, a multiple of 80 from 80 to 2400 (default: 480)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")


def _transcribe(args) -> int:
    from .archive import Ranks, collect, outputs, run_job

    files = collect(args.files)
    ranks = Ranks.init()
    options = dict(delay_ms=args.delay_ms, temperature=args.temperature, max_tokens=args.max_tokens,
                   batch_size=args.batch_size, workers=args.workers)
    if args.output_dir is None:
        if args.resume:
            raise VoxtralError("--resume needs --output-dir (it skips files whose output exists)")
        if ranks.size > 1:
            raise VoxtralError(f"{ranks.size} processes need --output-dir: each writes its own files there")
        return _transcribe_to_stdout(load_model(args), [f.path for f in files], args.format, args.quiet, options)
    out_dir = Path(args.output_dir)
    outputs(files, out_dir, args.format)  # clashing names fail before the model loads
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args, quiet=args.quiet or ranks.rank != 0)
    try:
        summary = run_job(model, files, out_dir, args.format, resume=args.resume,
                          log_path=Path(args.log) if args.log else None, ranks=ranks, quiet=args.quiet,
                          status=lambda line: print(f"{PROG}: {line}", file=sys.stderr), **options)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: every output written is complete; run the same command with "
              "--resume to finish the job", file=sys.stderr)
        return 130
    if ranks.rank == 0 and not args.quiet:
        print(f"{summary.done} transcribed ({summary.audio_seconds / 3600:.2f} h of audio), "
              f"{summary.skipped} skipped, {summary.failed} failed", file=sys.stderr)
    return 1 if summary.failed else 0


def _transcribe_to_stdout(model, files: list, fmt: str, quiet: bool, options: dict) -> int:
    """Each file's text on stdout, in the order given (files finish out of order)."""
    from tqdm import tqdm

    from .generate import transcribe_many

    bar = tqdm(desc="transcribing", unit="s", disable=quiet or None, leave=False,
               bar_format="{desc}: {n:.0f} s of audio [{elapsed}]")
    finished, failed, next_out = {}, 0, 0

    def advance(seconds: float) -> None:
        bar.n = max(bar.n + seconds, 0.0)
        bar.refresh()

    try:
        for r in transcribe_many(model, files, progress=advance, **options):
            if not r.ok:
                failed += 1
                bar.write(f"{PROG}: error: {files[r.index]}: {r.error}", file=sys.stderr)
            finished[r.index] = r
            while next_out in finished:
                done = finished.pop(next_out)
                if done.ok:
                    sys.stdout.write(render(done.result, fmt))
                    sys.stdout.flush()
                next_out += 1
    finally:
        bar.close()
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

    p = sub.add_parser("transcribe", help="transcribe audio files, folders of them, archives",
                       description="Transcribe audio files: one, or a whole archive (resumable; "
                                   "under mlx.launch, shared out among the processes).")
    p.add_argument("files", nargs="+", metavar="INPUT",
                   help="an audio file (wav, flac, mp3, m4a, ogg, webm, ...), a folder (its audio files, "
                        "recursively), a glob pattern ('talks/**/*.mp3') or @list.txt (one input per line)")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many text tokens")
    p.add_argument("--format", choices=FORMATS, default="txt", help="output format (default: txt)")
    p.add_argument("--output-dir", default=None,
                   help="write each transcript to DIR/<path relative to the inputs' common folder>.<format> "
                        "(default: print the text to stdout)")
    p.add_argument("--resume", action="store_true",
                   help="skip files whose output exists in --output-dir (outputs are written whole or not at all)")
    p.add_argument("--log", default=None, metavar="FILE",
                   help=f"the job log, JSON lines appended (default: OUTPUT_DIR/{LOG_NAME})")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="files decoded together in one batch (default: 4)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="threads decoding audio ahead of the model (default: 2)")
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
