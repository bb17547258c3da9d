"""Archive jobs: ``mlx-voxtral transcribe`` over many files, resumable, on one machine or many.

A job is a list of audio files (folders, globs, ``@list.txt`` files and plain paths, see
``collect``), one output per file (``outputs``) and a JSONL log. Under ``mlx.launch`` every
process (rank) runs the same command: the ranks agree, through ``mx.distributed``
collectives only, on which files are already done and how long each is, share the rest out
by audio duration (longest first, each to the least loaded rank), transcribe their share
with ``transcribe_many`` and write their own outputs; rank 0 gathers the job log.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .audio import probe_duration
from .exceptions import VoxtralError
from .writers import render, write_atomic

# What a folder contributes: files with these extensions, found recursively.
AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .mp3 .m4a .mp4 .aac .ogg .oga .opus .webm .mka .mkv .mov .aif .aiff .aifc .caf .wma .amr"
    " .3gp .au .snd".split()
)
LOG_NAME = "voxtral-job.jsonl"


@dataclass(frozen=True)
class Found:
    """An audio file of a job, and its name in the job: its path relative to the folder (or
    the fixed part of the glob) that found it; its file name when it was named itself."""

    path: Path
    name: Path


def collect(inputs: list[str]) -> list[Found]:
    """The audio files ``inputs`` name, in order, each once.

    Each input is a file; a folder (its audio files, recursively, sorted); a glob pattern
    (``**`` recurses; matches sorted); or ``@list.txt``, a text file of inputs, one per line
    (blank lines and ``#`` comments skipped; relative paths are relative to the list's folder).

    Raises ``VoxtralError`` for an input that names nothing (a missing file, a pattern that
    matches nothing, a folder without audio, an empty list).
    """
    seen: dict[Path, Found] = {}
    missing = []

    def found(path: Path, root: Optional[Path]) -> None:
        path = path.absolute()
        seen.setdefault(path, Found(path, path.relative_to(root.absolute()) if root else Path(path.name)))

    def add(item: str, base: Optional[Path] = None) -> None:
        if item.startswith("@"):
            listing = Path(item[1:]) if base is None else base / item[1:]
            if not listing.is_file():
                raise VoxtralError(f"no such list file: {listing}")
            lines = [ln.strip() for ln in listing.read_text(encoding="utf-8").splitlines()]
            entries = [ln for ln in lines if ln and not ln.startswith("#")]
            if not entries:
                raise VoxtralError(f"the list {listing} names no files")
            for entry in entries:
                add(entry, listing.parent)
            return
        path = Path(item) if base is None or Path(item).is_absolute() else base / item
        if path.is_file():
            found(path, None)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
            if not files:
                raise VoxtralError(f"no audio files in {path}")
            for p in files:
                found(p, path)
        elif glob.has_magic(str(path)):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise VoxtralError(f"no files match {item}")
            fixed = Path(*[part for part in itertools.takewhile(lambda p: not glob.has_magic(p), path.parts)])
            for p in files:
                found(p, fixed)
        else:
            missing.append(str(path))

    for item in inputs:
        add(item)
    if missing:
        raise VoxtralError(f"no such file: {', '.join(missing)}")
    return list(seen.values())


def outputs(files: list[Found], out_dir: Path, fmt: str) -> list[Path]:
    """Where each file's transcript goes: its name in the job under ``out_dir``, with the
    format's extension (``talks/`` finds ``2024/a.mp3``: ``D/2024/a.txt``). Files whose
    transcripts would collide (``a.wav`` beside ``a.mp3``) keep their extension (``a.wav.txt``).

    Raises ``VoxtralError`` when two files have the same name in the job (``x/a.wav`` and
    ``y/a.wav`` given as two folders): name their common folder instead.
    """
    stems = [f.name.with_suffix("") for f in files]
    counts = collections.Counter(stems)
    names = [s if counts[s] == 1 else f.name for f, s in zip(files, stems)]
    clashes = [n for n, c in collections.Counter(names).items() if c > 1]
    if clashes:
        paths = [str(f.path) for f, n in zip(files, names) if n in clashes]
        raise VoxtralError(f"these files would write the same output: {', '.join(paths)}; "
                           "give their common folder as the input instead")
    return [out_dir / n.with_name(f"{n.name}.{fmt}") for n in names]


def shard(durations: list[float], size: int) -> list[list[int]]:
    """Indices of ``durations`` shared out among ``size`` ranks: longest first, each to the
    rank with the least audio so far (ties to the lower rank). Deterministic."""
    loads = [0.0] * size
    shares: list[list[int]] = [[] for _ in range(size)]
    for i in sorted(range(len(durations)), key=lambda i: (-durations[i], i)):
        r = min(range(size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += durations[i]
    return shares


@dataclass
class Ranks:
    """This process's place in the job: ``rank`` of ``size`` (1 outside ``mlx.launch``)."""

    group: object = None
    rank: int = 0
    size: int = 1

    @classmethod
    def init(cls) -> "Ranks":
        if not mx.distributed.is_available():
            return cls()
        group = mx.distributed.init()
        return cls(group, group.rank(), group.size())

    # the collectives run on the CPU, where MLX's ring and MPI backends run them
    def sum(self, values: np.ndarray) -> np.ndarray:
        if self.size == 1:
            return values
        out = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        return np.array(out)

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        if self.size == 1:
            return [data]
        lengths = self.sum(np.eye(self.size, dtype=np.int32)[self.rank] * len(data)).tolist()
        width = max(max(lengths), 1)
        padded = np.zeros(width, np.uint8)
        padded[: len(data)] = np.frombuffer(data, np.uint8)
        gathered = mx.distributed.all_gather(mx.array(padded), group=self.group, stream=mx.cpu)
        rows = np.array(gathered).reshape(self.size, width)
        return [rows[r, : lengths[r]].tobytes() for r in range(self.size)]


def _estimate(durations: list[Optional[float]], files: list[Path]) -> list[float]:
    """Durations where known; elsewhere the file's size at the known files' seconds per byte
    (or 1 s per MB when none is known)."""
    known = [(d, files[i].stat().st_size) for i, d in enumerate(durations) if d]
    rate = sum(d for d, _ in known) / max(sum(b for _, b in known), 1) if known else 1e-6
    return [d if d else files[i].stat().st_size * rate for i, d in enumerate(durations)]


@dataclass
class JobSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    audio_seconds: float = 0.0


def run_job(
    model,
    found: list[Found],
    out_dir: Path,
    fmt: str,
    *,
    resume: bool = False,
    log_path: Optional[Path] = None,
    ranks: Optional[Ranks] = None,
    batch_size: int = 4,
    workers: int = 2,
    quiet: bool = False,
    status: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    **options,
) -> JobSummary:
    """Transcribe the ``found`` files into ``out_dir`` (see the module docstring); returns this job's
    counts over all ranks. ``options`` go to ``transcribe_many``.

    Each output is written atomically (a complete file or none, also on Ctrl-C or a kill);
    with ``resume`` a file whose output exists is skipped. The log (default
    ``out_dir/voxtral-job.jsonl``) gets one JSON line per file: ``file``, ``output``,
    ``status`` (done, skipped or failed), ``audio_seconds``, ``wall_seconds``, ``rtfx``,
    ``attempts``, ``error``, ``rank``; appended as each file ends by a single process, and
    by rank 0 at the end of the job under ``mlx.launch``.
    """
    from tqdm import tqdm

    from .generate import transcribe_many

    ranks = ranks or Ranks()
    targets = outputs(found, out_dir, fmt)
    files = [f.path for f in found]
    log_path = log_path or out_dir / LOG_NAME
    n = len(files)
    present = np.array([resume and t.is_file() for t in targets], np.int32)
    done = ranks.sum(present) > 0
    todo = [i for i in range(n) if not done[i]]
    probed = np.zeros(n, np.float32)  # every rank reads the headers of its 1/size of the files
    for j, i in enumerate(todo):
        if j % ranks.size == ranks.rank:
            probed[i] = probe_duration(files[i]) or -1.0
    probed = ranks.sum(probed)
    estimates = _estimate([float(probed[i]) if probed[i] > 0 else None for i in todo], [files[i] for i in todo])
    duration = dict(zip(todo, estimates))
    mine = [todo[j] for j in shard(estimates, ranks.size)[ranks.rank]]
    records: list[dict] = []
    log = open(log_path, "a", encoding="utf-8") if ranks.size == 1 else None

    def record(entry: dict) -> None:
        entry["rank"] = ranks.rank
        records.append(entry)
        if log is not None:
            log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            log.flush()

    if ranks.rank == 0:
        for i in range(n):
            if done[i]:
                record({"file": str(files[i]), "output": str(targets[i]), "status": "skipped"})
    total = sum(duration[i] for i in mine)
    bar = tqdm(total=total, disable=quiet or None, unit="s", dynamic_ncols=True,
               desc="transcribing" if ranks.size == 1 else f"rank {ranks.rank}/{ranks.size}",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")
    counts = {"done": 0, "failed": 0, "seconds": 0.0}
    prefix = f"[rank {ranks.rank}] " if ranks.size > 1 else ""
    t0 = time.perf_counter()

    def show() -> None:
        rate = bar.n / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{bar.n / 3600:.2f}/{total / 3600:.2f} h audio, "
                            f"{counts['done'] + counts['failed']}/{len(mine)} files, {rate:.2f}x", refresh=True)

    def advance(seconds: float) -> None:
        bar.n = max(bar.n + seconds, 0.0)
        show()

    try:
        for r in transcribe_many(model, [files[i] for i in mine], batch_size=batch_size, workers=workers,
                                 progress=advance, **options):
            i = mine[r.index]
            entry = {"file": str(files[i]), "output": str(targets[i])}
            if r.ok:
                targets[i].parent.mkdir(parents=True, exist_ok=True)
                write_atomic(targets[i], render(r.result, fmt))
                seconds = r.result.audio_duration
                counts["done"] += 1
                counts["seconds"] += seconds
                entry.update(status="done", audio_seconds=round(seconds, 3), wall_seconds=round(r.wall_seconds, 3),
                             rtfx=round(seconds / max(r.wall_seconds, 1e-9), 3), attempts=r.attempts, error=None)
                if not quiet:
                    bar.write(f"{prefix}{files[i]} -> {targets[i]} ({seconds:.1f} s of audio)", file=sys.stderr)
            else:
                counts["failed"] += 1
                total -= duration[i]
                bar.total = max(total, bar.n)
                entry.update(status="failed", audio_seconds=None, wall_seconds=round(r.wall_seconds, 3), rtfx=None,
                             attempts=r.attempts, error=str(r.error))
                status(f"{prefix}error: {files[i]}: {r.error} (after {r.attempts} attempts)")
            record(entry)
            show()
    finally:
        bar.close()
        if log is not None:
            log.close()
    if ranks.size > 1:  # rank 0 writes every rank's records, in rank order
        blobs = ranks.gather_bytes("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in records).encode())
        if ranks.rank == 0:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(b"".join(blobs).decode())
    skipped = int(done.sum()) if ranks.rank == 0 else 0
    totals = ranks.sum(np.array([counts["done"], skipped, counts["failed"], counts["seconds"]], np.float32))
    return JobSummary(int(totals[0]), int(totals[1]), int(totals[2]), float(totals[3]))
