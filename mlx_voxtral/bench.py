"""Benchmark mlx_voxtral: speed and memory per backend, the host's cost per step, the machine's
limits, and peer implementations.

    python benchmarks/bench.py --random full --lengths 10,60 --precisions bf16,4 --backends cpu
    python benchmarks/bench.py --random deep --backends mlx --modes graph,syncs,fairness
    mlx-voxtral bench --model mistralai/Voxtral-Mini-4B-Realtime-2602 --peers all

For every backend and precision (a fresh subprocess each, so memory figures are clean) it
measures, as the modes ask:

* ``load``: load time and resident memory;
* ``offline``: encoder seconds per audio second, prefill tokens/s, decode ms/token, RTFx
  (audio seconds per wall second);
* ``streaming``: 80 ms chunks fed as fast as they are consumed: RTFx, latency from a chunk's
  arrival to its token, first text, and the host syncs per chunk (token reads and
  ``mx.eval`` calls, counted by instrumentation);
* ``concurrent``: N streams decoded together (tokens/s against one stream);
* ``graph``: milliseconds of graph building per decode step for 1, 8 and 32 streams (the
  host's cost of a step, which bounds a Metal GPU's throughput);
* ``fairness``: a live stream's per-chunk latency alone and while a long upload is
  transcribed beside it, scheduled as the server's engine does;
* ``archive``: an archive of N files (the audio, shifted per file, as wav files) through
  ``transcribe_many``, one file at a time and N at once: audio hours per wall hour, the
  files' decoding included;
* ``dual``: live streaming (80 ms chunks, each fed once the previous one is decoded) at one
  delay and with dual delay (the same delay plus a faster one over the same encoder pass):
  RTFx of each and the cost ratio;
* ``dialects``: each realtime dialect (vLLM, OpenAI, Mistral) through a real server on
  loopback, 80 ms chunks sent at real-time pace: per-chunk latency (a text event's arrival
  after the chunk sent just before it) and the end-of-audio latency (the last chunk to the
  final text); and the cost of server-side turn detection (webrtcvad) per 30 ms frame;
* ``imports``: offline RTFx with ``import mlx.core`` before and after ``import mlx_voxtral``.

It also measures the machine (memory read bandwidth, matmul throughput per backend and
dtype) and prints each figure next to its bound: a decode step cannot beat (weight bytes read
per step) / bandwidth, the encoder cannot beat (FLOPs per audio second) / matmul throughput.

Peers (voxmlx, mlx-audio, mistral.rs's ``mistralrs`` wheel, transformers on CPU) run on
the same checkpoint and audio, each in its own subprocess (optionally another Python with
``--peer-python``); a peer that fails is reported with its error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import ModelArgs
from .exceptions import VoxtralError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000

# precision -> (load dtype, quantize bits, quantization mode). "bf16" loads the stored bf16
# weights as they are (dtype None: on CPU that computes in float32, the loader's default and
# fastest path); "stored" loads any folder as it is (a converted, pre-quantized one included);
# a number is that many bits of affine quantization in groups of 64, a mode name MLX's mode.
PRECISIONS = {"fp32": ("float32", None, None), "bf16": (None, None, None),
              **{str(b): (None, b, "affine") for b in (8, 6, 5, 4, 3, 2)},
              "mxfp8": (None, 8, "mxfp8"), "mxfp4": (None, 4, "mxfp4"), "nvfp4": (None, 4, "nvfp4"),
              "stored": (None, None, None)}
# storage of one matmul weight: affine adds a bf16 scale and bias per group of 64, the fp
# modes one 8-bit scale per group (32; nvfp4: 16)
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0,
                    **{str(b): b / 8 + 4 / 64 for b in (8, 6, 5, 4, 3, 2)},
                    "mxfp8": 1 + 1 / 32, "mxfp4": 0.5 + 1 / 32, "nvfp4": 0.5 + 1 / 16}

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. Speech recognition runs locally on a laptop, "
    "without sending audio anywhere. She sells sea shells by the sea shore. Seven silver swans "
    "swam silently seaward in the early morning light. A journey of a thousand miles begins with "
    "a single step. Please call Stella and ask her to bring these things with her from the store."
)


# ---------------------------------------------------------------------------------------
# inputs


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_voxtral"


def random_checkpoint(preset: str) -> Path:  # tiny, deep (tiny widths, real depth) or full
    """A cached random-weight checkpoint in the native layout (generated once)."""
    out = cache_dir() / f"random-{preset}"
    if not (out / "consolidated.safetensors").exists():
        script = REPO / "scripts" / "make_random_checkpoint.py"
        if not script.exists():
            raise SystemExit(f"--random needs the repository's {script}")
        print(f"generating the {preset} random checkpoint in {out} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(script), "--preset", preset, "--out", str(out)], check=True)
    return out


def speech(seconds: float, path: Optional[str]) -> np.ndarray:
    """``seconds`` of speech: the given file, or espeak-ng sentences, tiled to length."""
    from .audio import load_audio

    if path is None:
        if shutil.which("espeak-ng") is None:
            raise SystemExit("no --audio given and espeak-ng is not installed to synthesize speech")
        wav = cache_dir() / "bench-speech.wav"
        if not wav.exists():
            wav.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["espeak-ng", "-w", str(wav), SENTENCES], check=True, capture_output=True)
        path = str(wav)
    audio = load_audio(path)
    n = int(seconds * SAMPLE_RATE)
    return np.resize(audio, n).astype(np.float32) if n else audio


# ---------------------------------------------------------------------------------------
# machine limits


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Sustained read bandwidth (GB/s): every core sums its share of a large array (the
    native kernels' vector loop where they are built, the best of ``repeats`` reads)."""
    from . import cpu
    from .cpu import native

    data = np.ones(int(gib * 2**30) // 4, np.float32)
    if cpu.available():
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            native.read_sum(data)
            best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
        return best
    n_threads = os.cpu_count() or 1
    parts = np.array_split(data, n_threads)
    best = 0.0
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def probe_layer(precision: str, k: int, n: int):
    """A random linear layer [n, k] in ``precision``, as loading quantizes one."""
    import mlx.core as mx
    import mlx.nn as nn

    layer = nn.Linear(k, n, bias=False)
    _, bits, mode = PRECISIONS[precision]
    if bits:  # (nn.quantize swaps a model's children, never the module it is given)
        layer = nn.QuantizedLinear.from_linear(layer, group_size=64 if mode == "affine" else None, bits=bits, mode=mode)
    elif precision in ("bf16", "stored"):
        layer.weight = layer.weight.astype(mx.bfloat16)
    mx.eval(layer.parameters())
    return layer


def matmul_throughput(precision: str, backend: str, m: int = 1024, k: int = 3072, n: int = 3072) -> float:
    """GFLOP/s of ``x @ W.T`` with float32 ``x`` and the precision's weights, through what
    the backend multiplies with (the CPU backend's kernels over its BLAS, or MLX)."""
    import mlx.core as mx

    layer = probe_layer(precision, k, n)
    if backend == "cpu":
        from .cpu.layers import linear_rows

        x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
        run = lambda: linear_rows(layer, x)  # noqa: E731
    else:
        x = mx.random.normal((m, k))
        run = lambda: mx.eval(layer(x))  # noqa: E731
    run()
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 1.0:
        run()
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def measure_machine(precisions: list[str], backends: list[str]) -> dict:
    from . import cpu
    from .cpu import native

    has_cpu = cpu.available()
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "device": str(__import__("mlx.core").core.default_device()),
        "blas": native.blas,
        "native_kernels": has_cpu,
        "memory_bandwidth_gbs": round(memory_bandwidth(), 2),
        # every precision through what multiplies it (on the CPU backend 4/8-bit weights in
        # integers, the others in float32 with the BLAS), and fp32 for reference
        "matmul_gflops": {
            b: {p: round(matmul_throughput(p, b), 1) for p in dict.fromkeys(["fp32", *precisions])}
            for b in backends
        },
    }


# ---------------------------------------------------------------------------------------
# model costs (what the bounds are computed from)


def bytes_per_weight(args: ModelArgs, precision: str) -> float:
    """Storage of one matmul weight (quantized: with its group's bf16 scale and bias)."""
    if precision != "stored":
        return BYTES_PER_WEIGHT[precision]
    q = args.quantization
    if not q:
        return 2.0
    # affine: a bf16 scale and bias per group; the fp modes: one 8-bit scale
    return q["bits"] / 8 + (4 if q.get("mode", "affine") == "affine" else 1) / q["group_size"]


def model_costs(args: ModelArgs, precision: str) -> dict:
    """Bytes of weights one decode step reads and FLOPs per second of audio for the encoder."""
    a = args
    e = a.encoder
    dec_layer = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    dec_layer += 3 * a.dim * a.hidden_dim
    step_weights = a.n_layers * dec_layer + a.vocab_size * a.dim  # + tied LM head
    enc_layer = e.dim * (e.n_heads + 2 * e.n_kv_heads) * e.head_dim + e.n_heads * e.head_dim * e.dim
    enc_layer += 3 * e.dim * e.hidden_dim
    frames_per_s = 50.0
    window = e.sliding_window
    attention = 2 * 2 * e.n_heads * e.head_dim * window  # QK^T and AV per frame, full window
    conv = 2 * 3 * (e.audio_encoding_args.num_mel_bins * e.dim * 2 + e.dim * e.dim)  # per 50 Hz frame
    adapter = 2 * (e.dim * a.downsample_factor * a.dim + a.dim * a.dim) / a.downsample_factor
    encoder_flops = frames_per_s * (2 * e.n_layers * enc_layer + e.n_layers * attention + conv + adapter)
    return {
        "decode_step_bytes": step_weights * bytes_per_weight(args, precision),
        "encoder_flops_per_audio_s": encoder_flops,
    }


# ---------------------------------------------------------------------------------------
# one precision, in a worker process


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # macOS: no /proc; report the peak instead
        return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Result:
    precision: str
    backend: str = ""
    load_s: float = 0.0
    rss_before_load_gb: float = 0.0  # interpreter, MLX and the tokenizer library
    rss_after_load_gb: float = 0.0
    weights_gb: float = 0.0  # after - before: what the loaded model occupies
    peak_load_rss_gb: float = 0.0
    peak_rss_gb: float = 0.0
    offline: dict = field(default_factory=dict)
    streaming: dict = field(default_factory=dict)
    concurrent: dict = field(default_factory=dict)
    graph: dict = field(default_factory=dict)
    fairness: dict = field(default_factory=dict)
    archive: dict = field(default_factory=dict)
    dual: dict = field(default_factory=dict)
    dialects: dict = field(default_factory=dict)
    import_first: str = "mlx_voxtral"
    error: Optional[str] = None


def _offline(model, audio: np.ndarray) -> dict:
    from .generate import transcribe

    r = transcribe(model, audio)
    t = r.timings
    n_decode = max(len(r.token_ids) - 1, 1)
    return {
        "audio_s": round(r.audio_duration, 2),
        "tokens": len(r.token_ids),
        "encode_s": round(t.encode, 3),
        "prefill_s": round(t.prefill, 3),
        "decode_s": round(t.decode, 3),
        "encoder_s_per_audio_s": round(t.encode / r.audio_duration, 4),
        "prefill_tok_s": round(r.prompt_tokens / t.prefill, 1) if t.prefill else None,
        "decode_ms_per_token": round(1000 * t.decode / n_decode, 2),
        "rtfx": round(r.rtfx, 3),
        "peak_rss_gb": round(_peak_rss() / 1e9, 3),
    }


def _caught_up(batch, session) -> bool:
    """The session has decoded everything its audio allows so far."""
    st = session.stream
    return session.done or (not batch.in_flight(session) and st.pending_tokens() == 0
                            and st.buffered < st.next_length())


def _streaming(model, audio: np.ndarray, chunk_ms: int = 80) -> dict:
    """80 ms chunks, each fed once the previous one is decoded; latency = a chunk's arrival
    to its token; host syncs = token reads and ``mx.eval`` calls per chunk once decoding."""
    import mlx.core as mx

    from .generate import Batch
    from .session import Session

    chunk = int(SAMPLE_RATE * chunk_ms / 1000)
    session, batch = Session(model), Batch(model)
    batch.add(session)
    evals = [0]
    real_eval = mx.eval

    def counted(*args):
        evals[0] += 1
        return real_eval(*args)

    latencies, syncs = [], []
    first_text: Optional[float] = None
    mx.eval = counted
    try:
        t0 = time.perf_counter()
        for i in range(0, len(audio), chunk):
            arrival = time.perf_counter()
            reads, before = batch.host_reads, evals[0]
            session.push(audio[i : i + chunk])
            decoded = len(session.token_ids)
            events = batch.drain().get(session, [])
            if first_text is None and any(type(e).__name__ == "TextDelta" for e in events):
                first_text = time.perf_counter() - t0
            if len(session.token_ids) > decoded:
                latencies.append(time.perf_counter() - arrival)
                syncs.append(batch.host_reads - reads + evals[0] - before)
        session.finish()
        batch.drain()
        wall = time.perf_counter() - t0
    finally:
        mx.eval = real_eval
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {
        "chunk_ms": chunk_ms,
        "rtfx": round(len(audio) / SAMPLE_RATE / wall, 3),
        "first_text_s_from_start": round(first_text, 3) if first_text is not None else None,
        "event_latency_p50_s": round(float(np.percentile(lat, 50)), 3),
        "event_latency_p95_s": round(float(np.percentile(lat, 95)), 3),
        "model_delay_s": round(model.tokenizer.default_delay_ms / 1000, 3),
        "host_syncs_per_chunk_mean": round(float(np.mean(syncs)), 2) if syncs else None,
        "host_syncs_per_chunk_max": int(max(syncs)) if syncs else None,
    }


def _sessions(model, audio: np.ndarray, n: int) -> list:
    """``n`` finished sessions over ``audio`` at different offsets (so they are not identical)."""
    from .session import Session

    sessions = [Session(model) for _ in range(n)]
    for i, s in enumerate(sessions):
        shift = (i * 3 * SAMPLE_RATE) % max(len(audio), 1)
        s.push(np.roll(audio, -shift))
        s.finish()
    return sessions


def _concurrent(model, audio: np.ndarray, streams: int) -> dict:
    """Tokens/s of N sessions decoded together (one ``Batch``) vs one alone."""
    from .generate import Batch

    def run(n: int) -> float:
        batch = Batch(model)
        sessions = _sessions(model, audio, n)
        for s in sessions:
            batch.add(s)
        t0 = time.perf_counter()
        while not all(s.done for s in sessions):
            batch.step()
        return sum(len(s.token_ids) for s in sessions) / (time.perf_counter() - t0)

    single = run(1)
    many = run(streams)
    return {
        "streams": streams,
        "single_tokens_per_s": round(single, 2),
        "batched_tokens_per_s": round(many, 2),
        "speedup": round(many / single, 2),
    }


def _archive(model, audio: np.ndarray, files: int) -> dict:
    """Audio hours per hour of ``transcribe_many`` over ``files`` wav files: one at a time,
    and all at once."""
    import soundfile as sf

    from .generate import transcribe_many

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(files):
            paths.append(os.path.join(tmp, f"{i}.wav"))
            sf.write(paths[-1], np.roll(audio, -((i * 3 * SAMPLE_RATE) % max(len(audio), 1))), SAMPLE_RATE)
        out = {"files": files, "audio_s_per_file": round(len(audio) / SAMPLE_RATE, 2)}
        for batch_size in (1, files):
            t0 = time.perf_counter()
            seconds = sum(r.result.audio_duration for r in transcribe_many(model, paths, batch_size=batch_size))
            out[f"audio_h_per_h_batch_{batch_size}"] = round(seconds / (time.perf_counter() - t0), 3)
    out["speedup"] = round(out[f"audio_h_per_h_batch_{files}"] / out["audio_h_per_h_batch_1"], 2)
    return out


def _graph(model, audio: np.ndarray, counts: list[int]) -> dict:
    """Milliseconds spent building (and dispatching) a decode step's graphs, median over the
    steps that only decode, for each number of streams."""
    from .generate import Batch

    out = {}
    for n in counts:
        batch = Batch(model)
        sessions = _sessions(model, audio, n)
        for s in sessions:
            batch.add(s)
        builds = []
        while not all(s.done for s in sessions):
            batch.step()
            last = batch.last_step
            if last["decoded"] == n and not last["encoded"] and not last["prompts"]:
                builds.append(last["build_s"])
        out[str(n)] = round(1000 * float(np.median(builds)), 2) if builds else None
    return {"build_ms_per_decode_step": out}


def _fairness(model, live: np.ndarray, upload: np.ndarray, chunk_ms: int = 80) -> dict:
    """A live stream's per-chunk latency (a chunk's arrival, at real-time pace or as soon as
    the previous one is decoded, to its last token) alone, then while ``upload`` is
    transcribed in the same batch, fed and scheduled as the server's engine does."""
    from .generate import Batch
    from .server.engine import ENCODE_TOKENS, Blocks, array_blocks, feed_offline
    from .session import Session

    chunk = int(SAMPLE_RATE * chunk_ms / 1000)

    def run(with_upload: bool) -> np.ndarray:
        batch = Batch(model, ENCODE_TOKENS)
        session = Session(model)
        batch.add(session)
        other, fed, blocks = None, 0, Blocks(array_blocks(upload))
        if with_upload:
            other = Session(model)
            batch.add(other)
        latencies = []
        start = time.perf_counter()
        for k, i in enumerate(range(0, len(live), chunk)):
            arrival = max(start + k * chunk_ms / 1000, time.perf_counter())
            while time.perf_counter() < arrival:  # the upload goes on between the chunks
                if other is None or other.done:
                    time.sleep(max(0.0, arrival - time.perf_counter()))
                    break
                fed = feed_offline(other, blocks, fed)
                batch.step()
            arrival = max(arrival, start + k * chunk_ms / 1000)
            session.push(live[i : i + chunk])
            decoded = len(session.token_ids)
            while not _caught_up(batch, session):
                if other is not None and not other.done:
                    fed = feed_offline(other, blocks, fed)
                batch.step()
            if len(session.token_ids) > decoded:
                latencies.append(time.perf_counter() - arrival)
        return np.array(latencies)

    alone, shared = run(False), run(True)
    p95 = lambda x: float(np.percentile(x, 95))  # noqa: E731
    return {
        "live_s": round(len(live) / SAMPLE_RATE, 1),
        "upload_s": round(len(upload) / SAMPLE_RATE, 1),
        "alone_p50_s": round(float(np.median(alone)), 4),
        "alone_p95_s": round(p95(alone), 4),
        "with_upload_p50_s": round(float(np.median(shared)), 4),
        "with_upload_p95_s": round(p95(shared), 4),
        "p95_ratio": round(p95(shared) / p95(alone), 2),
    }


def _live_rtfx(model, audio: np.ndarray, delays: tuple, chunk_ms: int = 80) -> tuple[float, int]:
    """RTFx of one live stream (80 ms chunks, each fed once the previous is decoded) decoded
    at ``delays[0]``, followed at the faster ``delays[1:]`` (dual delay); and the encoder's tokens."""
    from .generate import Batch
    from .session import Session

    chunk = int(SAMPLE_RATE * chunk_ms / 1000)
    batch = Batch(model)
    sessions = [Session(model, d) for d in delays]
    batch.add(sessions[0])
    for s in sessions[1:]:
        batch.add(s, follows=sessions[0])
    t0 = time.perf_counter()
    for i in range(0, len(audio), chunk):
        for s in sessions:
            s.push(audio[i : i + chunk])
        batch.drain()
    for s in sessions:
        s.finish()
    batch.drain()
    return len(audio) / SAMPLE_RATE / (time.perf_counter() - t0), batch.encoded_tokens


def _dual(model, audio: np.ndarray, delay_ms: int = 480, fast_ms: int = 160) -> dict:
    one, tokens_one = _live_rtfx(model, audio, (delay_ms,))
    two, tokens_two = _live_rtfx(model, audio, (delay_ms, fast_ms))
    return {"delay_ms": delay_ms, "provisional_delay_ms": fast_ms, "rtfx_one": round(one, 3),
            "rtfx_dual": round(two, 3), "cost_ratio": round(one / two, 2),
            "encoder_tokens_one": tokens_one, "encoder_tokens_dual": tokens_two}


def _dialects(model, audio: np.ndarray, chunk_ms: int = 80) -> dict:
    """Each dialect through a real server on loopback (see the module docstring)."""
    import asyncio
    import base64
    import socket

    import uvicorn
    import websockets

    from .server.app import create_app

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = int(SAMPLE_RATE * chunk_ms / 1000) * 2
    dialects = {
        "vllm": ("/v1/realtime", {"type": "session.update", "model": "default"}, "input_audio_buffer.append",
                 {"type": "input_audio_buffer.commit", "final": True}, {"transcription.delta"}, "transcription.done"),
        "openai": ("/v1/realtime", {"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "turn_detection": None}}}},
            "input_audio_buffer.append", {"type": "input_audio_buffer.commit"},
            {"conversation.item.input_audio_transcription.delta"},
            "conversation.item.input_audio_transcription.completed"),
        "mistral": ("/v1/audio/transcriptions/realtime", {"type": "session.update", "session": {
            "audio_format": {"encoding": "pcm_s16le", "sample_rate": SAMPLE_RATE}}}, "input_audio.append",
            {"type": "input_audio.flush"}, {"transcription.text.delta"}, "transcription.done"),
    }

    async def one(url, update, append, end, deltas, final) -> dict:
        async with websockets.connect(url, max_size=None) as ws:
            await ws.recv()
            await ws.send(json.dumps(update))
            sent, latencies, done = [0.0], [], asyncio.get_running_loop().create_future()

            async def reader():
                while True:
                    event = json.loads(await ws.recv())
                    if event["type"] in deltas:
                        latencies.append(time.perf_counter() - sent[0])
                    elif event["type"] in (final, "error"):
                        done.set_result((time.perf_counter(), event))
                        return

            task = asyncio.create_task(reader())
            start = time.perf_counter()
            for k, i in enumerate(range(0, len(pcm), step)):
                await asyncio.sleep(max(0.0, start + k * chunk_ms / 1000 - time.perf_counter()))
                sent[0] = time.perf_counter()
                await ws.send(json.dumps({"type": append, "audio": base64.b64encode(pcm[i : i + step]).decode()}))
            end_at = time.perf_counter()
            await ws.send(json.dumps(end))
            finished, event = await done
            await task
            if event["type"] == "error":
                raise VoxtralError(f"the server answered an error: {event}")
        lat = np.array(latencies) if latencies else np.zeros(1)
        return {"events": len(latencies), "chunk_latency_p50_s": round(float(np.median(lat)), 4),
                "chunk_latency_p95_s": round(float(np.percentile(lat, 95)), 4),
                "end_latency_s": round(finished - end_at, 3)}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, model_name="default"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        out = {name: asyncio.run(one(f"ws://127.0.0.1:{port}{d[0]}", *d[1:])) for name, d in dialects.items()}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    out["audio_s"] = round(len(audio) / SAMPLE_RATE, 1)
    from .server.realtime.vad import FRAME, VoiceActivity

    vad, start = VoiceActivity(), time.perf_counter()
    for i in range(0, len(audio), SAMPLE_RATE // 10):
        list(vad(audio[i : i + SAMPLE_RATE // 10]))
    out["vad_us_per_frame"] = round((time.perf_counter() - start) / (len(audio) / FRAME) * 1e6, 1)
    return out


def load_options(precision: str, backend: str) -> dict[str, Any]:
    """``load``'s keyword arguments for one of ``PRECISIONS`` on ``backend``."""
    dtype_name, bits, mode = PRECISIONS[precision]
    options: dict[str, Any] = {"dtype": dtype_name, "backend": backend}
    if bits:
        options.update(quantize=bits, mode=mode)
    return options


def run_worker(spec: dict) -> dict:
    """Everything for one backend and precision (runs in its own process)."""
    from .loader import load

    result = Result(spec["precision"], spec["backend"], import_first=spec.get("import_first", "mlx_voxtral"))
    importlib.import_module(".tokenizer", __package__)  # mistral-common: counted before the model

    result.rss_before_load_gb = round(_rss() / 1e9, 3)
    t0 = time.perf_counter()
    model = load(spec["model"], **load_options(spec["precision"], spec["backend"]))
    result.load_s = round(time.perf_counter() - t0, 2)
    result.rss_after_load_gb = round(_rss() / 1e9, 3)
    result.weights_gb = round(result.rss_after_load_gb - result.rss_before_load_gb, 3)
    result.peak_load_rss_gb = round(_peak_rss() / 1e9, 3)
    lengths = spec["lengths"]
    audio = {s: speech(s, spec.get("audio")) for s in lengths}
    shortest = audio[min(lengths)]
    modes = spec["modes"]
    if "offline" in modes:
        result.offline = {str(s): _offline(model, audio[s]) for s in lengths}
    if "streaming" in modes:
        result.streaming = _streaming(model, shortest)
    if "concurrent" in modes:
        result.concurrent = _concurrent(model, shortest, spec["streams"])
    if "graph" in modes:
        result.graph = _graph(model, shortest, spec["graph_streams"])
    if "archive" in modes:
        result.archive = _archive(model, shortest, spec["streams"])
    if "dual" in modes:
        result.dual = _dual(model, shortest)
    if "dialects" in modes:
        result.dialects = _dialects(model, shortest)
    if "fairness" in modes:
        result.fairness = _fairness(model, shortest, speech(spec["upload_seconds"], spec.get("audio")))
    result.peak_rss_gb = round(_peak_rss() / 1e9, 3)
    return asdict(result)


def _in_subprocess(args: list[str], timeout: Optional[float], python: str = sys.executable) -> dict:
    try:
        proc = subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------
# peers

_PEER_CODE = {
    "voxmlx": """
import json, sys, time
t0 = time.perf_counter()
import voxmlx
from voxmlx.generate import generate
model, sp, config = voxmlx.load_model(sys.argv[1])
load_s = time.perf_counter() - t0
prompt, n_delay = voxmlx._build_prompt_tokens(sp)
t0 = time.perf_counter()
out = generate(model, sys.argv[2], prompt, n_delay_tokens=n_delay, eos_token_id=sp.eos_id)
print(json.dumps({"load_s": load_s, "transcribe_s": time.perf_counter() - t0, "tokens": len(out)}))
""",
    "mlx-audio": """
import json, sys, time
t0 = time.perf_counter()
from mlx_audio.stt.utils import load
model = load(sys.argv[1])
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
out = model.generate(sys.argv[2])
print(json.dumps({"load_s": load_s, "transcribe_s": time.perf_counter() - t0, "tokens": None}))
""",
    "mistral.rs": """
import json, sys, time
import mistralrs as m
arch = getattr(m, "MultimodalArchitecture", None) or m.VisionArchitecture
which = getattr(m.Which, "MultimodalPlain", None) or m.Which.VisionPlain
t0 = time.perf_counter()
runner = m.Runner(which=which(model_id=sys.argv[1], arch=arch.Voxtral), in_situ_quant=sys.argv[3] or None)
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
res = runner.send_chat_completion_request(m.ChatCompletionRequest(model="default", messages=[{"role": "user",
    "content": [{"type": "audio_url", "audio_url": {"url": sys.argv[2]}}, {"type": "text", "text": "Transcribe."}]}],
    max_tokens=100000, temperature=0.0))
print(json.dumps({"load_s": load_s, "transcribe_s": time.perf_counter() - t0, "tokens": res.usage.completion_tokens}))
""",
    "transformers": """
import json, sys, time
sys.path.insert(0, "tests")
import torch
torch.set_num_threads(__import__("os").cpu_count())
from reference import Reference
from mlx_voxtral.audio import load_audio
t0 = time.perf_counter()
ref = Reference(sys.argv[1])
load_s = time.perf_counter() - t0
audio = load_audio(sys.argv[2])
t0 = time.perf_counter()
out = ref.generate(audio)
print(json.dumps({"load_s": load_s, "transcribe_s": time.perf_counter() - t0, "tokens": len(out)}))
""",
}
PEER_PRECISION = {"voxmlx": "checkpoint dtype", "mlx-audio": "checkpoint dtype", "mistral.rs": "ISQ as given",
                  "transformers": "fp32"}
# mistral.rs's in-situ quantization -> our precision it matches ("" = none: the checkpoint's bf16)
MISTRALRS_MATCH = {"": "bf16", "Q4K": "4", "Q4_0": "4", "Q8_0": "8", "Q8K": "8"}


def run_peer(name: str, model: str, wav: str, seconds: float, python: str, timeout: float, isq: str) -> dict:
    out = _in_subprocess(["-c", _PEER_CODE[name], model, wav, isq], timeout, python)
    out["peer"] = name
    out["precision"] = PEER_PRECISION[name] + (f" ({isq})" if name == "mistral.rs" and isq else "")
    out["audio_s"] = seconds
    if name == "mistral.rs":
        out["matches"] = MISTRALRS_MATCH.get(isq)
    if "transcribe_s" in out:
        out["rtfx"] = round(seconds / out["transcribe_s"], 3)
    return out


# ---------------------------------------------------------------------------------------
# report


def _fmt(x: Any, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def bf16_bytes(path: Path) -> Optional[int]:
    """The size of the model in bf16 (2 bytes per parameter), for a folder not quantized."""
    from .loader import load_args, load_weights

    if load_args(path).quantization:
        return None
    return 2 * sum(a.size for a in load_weights(path).values())


def report(machine: dict, results: list[dict], peers: list[dict], args: ModelArgs,
           bf16_size: Optional[int] = None) -> str:
    bw = machine["memory_bandwidth_gbs"]
    gflops = "; ".join(f"{b}: " + ", ".join(f"{p} {v}" for p, v in g.items()) for b, g in machine["matmul_gflops"].items())
    lines = [
        f"machine: {machine['platform']}, {machine['cpus']} cpus, MLX device {machine['device']}; CPU backend "
        f"{'BLAS ' + str(machine['blas']) + ' + native kernels' if machine['native_kernels'] else 'unavailable'}; "
        f"read bandwidth {bw} GB/s; matmul GFLOP/s {gflops}",
        "",
        "load: resident GB after loading (the process), of which the weights (x the bf16 size), "
        "peak GB while loading",
    ]
    for r in results:
        if not r.get("error"):
            ratio = f" ({r['weights_gb'] * 1e9 / bf16_size:.3f}x bf16)" if bf16_size else ""
            lines.append(f"{r['backend']:>4} {r['precision']:>6} load {r['load_s']} s: RSS {r['rss_after_load_gb']} GB, "
                         f"weights {r['weights_gb']} GB{ratio}, peak {r['peak_load_rss_gb']} GB")
    lines += [
        "",
        f"{'backend':>7} {'prec.':>6} {'load s':>7} {'RSS GB':>7} {'peak GB':>8} {'audio s':>7} {'RTFx':>6} "
        f"{'enc s/s':>8} {'(bound)':>8} {'prefill t/s':>11} {'ms/token':>9} {'(bound)':>8}",
    ]
    for r in results:
        head = f"{r.get('backend', ''):>7} {r['precision']:>6}"
        if r.get("error"):
            lines.append(f"{head}  error: {r['error']}")
            continue
        costs = model_costs(args, r["precision"])
        decode_bound = 1000 * costs["decode_step_bytes"] / (bw * 1e9)
        # the arithmetic the precision runs on (integer tiles for 4/8-bit on the CPU backend)
        measured = machine["matmul_gflops"].get(r["backend"], {})
        gf = measured.get(r["precision"]) or measured.get("fp32")
        enc_bound = costs["encoder_flops_per_audio_s"] / (gf * 1e9) if gf else None
        if r["import_first"] != "mlx_voxtral":
            o = next(iter(r["offline"].values()))
            lines.append(f"{head} import mlx.core first: RTFx {o['rtfx']} at {o['audio_s']} s")
            continue
        for o in r["offline"].values():
            lines.append(
                f"{head} {r['load_s']:>7} {r['rss_after_load_gb']:>7} {r['peak_rss_gb']:>8} "
                f"{o['audio_s']:>7} {o['rtfx']:>6} {o['encoder_s_per_audio_s']:>8} {_fmt(enc_bound, '.4f'):>8} "
                f"{_fmt(o['prefill_tok_s']):>11} {o['decode_ms_per_token']:>9} {decode_bound:>8.1f}"
            )
        pad = " " * 14
        if not r["offline"]:
            lines.append(head)
        if r["streaming"]:
            s = r["streaming"]
            lines.append(
                f"{pad} streaming ({s['chunk_ms']} ms chunks): RTFx {s['rtfx']}, latency p50 {s['event_latency_p50_s']} s "
                f"/ p95 {s['event_latency_p95_s']} s after the chunk (+ the model's {s['model_delay_s']} s delay), "
                f"first text {s['first_text_s_from_start']} s; host syncs per chunk {s['host_syncs_per_chunk_mean']} "
                f"(max {s['host_syncs_per_chunk_max']})"
            )
        if r["concurrent"]:
            c = r["concurrent"]
            lines.append(f"{pad} {c['streams']} concurrent streams: {c['batched_tokens_per_s']} tok/s vs "
                         f"{c['single_tokens_per_s']} tok/s alone ({c['speedup']}x)")
        if r["graph"]:
            g = r["graph"]["build_ms_per_decode_step"]
            first = next(iter(g.values()))
            lines.append(f"{pad} graph building per decode step: " + ", ".join(
                f"{n} streams {ms} ms" for n, ms in g.items()) + (
                f" ({g[max(g, key=int)] / first:.2f}x from {min(g, key=int)} to {max(g, key=int)})" if first else ""))
        if r.get("archive"):
            a = r["archive"]
            many = a[f"audio_h_per_h_batch_{a['files']}"]
            lines.append(f"{pad} archive of {a['files']} files ({a['audio_s_per_file']} s each): "
                         f"{a['audio_h_per_h_batch_1']} audio h/h one at a time, {many} h/h {a['files']} at once "
                         f"({a['speedup']}x)")
        if r.get("dual"):
            d = r["dual"]
            lines.append(f"{pad} dual delay ({d['delay_ms']} + {d['provisional_delay_ms']} ms, live 80 ms chunks): "
                         f"RTFx {d['rtfx_dual']} vs {d['rtfx_one']} at one delay ({d['cost_ratio']}x the cost); "
                         f"encoder tokens {d['encoder_tokens_dual']} vs {d['encoder_tokens_one']}")
        if r.get("dialects"):
            d = r["dialects"]
            lines.append(f"{pad} realtime dialects ({d['audio_s']} s at real-time pace, 80 ms chunks): " + "; ".join(
                f"{n} per-chunk p50 {v['chunk_latency_p50_s']} / p95 {v['chunk_latency_p95_s']} s, end of audio to "
                f"final {v['end_latency_s']} s" for n, v in d.items() if isinstance(v, dict))
                + f"; turn detection {d['vad_us_per_frame']} us per 30 ms frame")
        if r["fairness"]:
            f = r["fairness"]
            lines.append(
                f"{pad} live stream ({f['live_s']} s) per-chunk latency: alone p50 {f['alone_p50_s']} / p95 "
                f"{f['alone_p95_s']} s; beside a {f['upload_s']} s upload p50 {f['with_upload_p50_s']} / p95 "
                f"{f['with_upload_p95_s']} s ({f['p95_ratio']}x at p95)"
            )
    if peers:
        lines += ["", "peers (same checkpoint, same audio):"]
        for p in peers:
            if p.get("error"):
                lines.append(f"  {p['peer']:>12} [{p['precision']}]: error: {p['error']}")
            else:
                lines.append(
                    f"  {p['peer']:>12} [{p['precision']}]: RTFx {p['rtfx']}, load {p['load_s']:.1f} s, "
                    f"transcribe {p['transcribe_s']:.1f} s"
                )
        lines += matched(results, peers)
    return "\n".join(lines)


def matched(results: list[dict], peers: list[dict]) -> list[str]:
    """Our offline RTFx against each peer run at the precision it matches, on the same audio."""
    lines = []
    for p in peers:
        ours = [r for r in results if r.get("precision") == p.get("matches") and not r.get("error")
                and str(p["audio_s"]) in r.get("offline", {})]
        for r in ours if p.get("rtfx") else []:
            rtfx = r["offline"][str(p["audio_s"])]["rtfx"]
            lines.append(f"  matching precision, {p['audio_s']} s: {r['backend']} {r['precision']} RTFx {rtfx} vs "
                         f"{p['peer']} [{p['precision']}] {p['rtfx']}: {rtfx / p['rtfx']:.2f}x")
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.get("offline"):
            xs = sorted(float(k) for k in r["offline"])
            ax.plot(xs, [r["offline"][k]["rtfx"] for k in sorted(r["offline"], key=float)], marker="o",
                    label=f"{r['backend']} {r['precision']}")
    ax.set_xlabel("audio length (s)")
    ax.set_ylabel("RTFx (audio s / wall s)")
    ax.set_title("mlx_voxtral offline transcription")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------
# entry point


def _worker_command(spec: dict) -> list[str]:
    """A worker process; ``import_first`` says which of ``mlx.core`` and ``mlx_voxtral`` it imports first."""
    order = ["mlx.core", "mlx_voxtral"] if spec.get("import_first") == "mlx" else ["mlx_voxtral", "mlx.core"]
    code = (f"import {order[0]}; import {order[1]}; import json, sys; from mlx_voxtral.bench import run_worker; "
            "print(json.dumps(run_worker(json.loads(sys.argv[1]))))")
    return ["-c", code, json.dumps(spec)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-voxtral bench", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder or Hugging Face repo id")
    src.add_argument("--random", choices=["tiny", "deep", "full"],
                     help="a cached random-weight checkpoint (deep: tiny widths at the real depth)")
    parser.add_argument("--audio", help="speech file (default: espeak-ng sentences)")
    parser.add_argument("--backends", default="auto", help="of cpu, mlx, auto (comma separated)")
    parser.add_argument("--lengths", default="60", help="audio lengths in seconds, comma separated")
    parser.add_argument("--precisions", default="fp32,bf16,8,4",
                        help="of fp32, bf16, 8, 6, 5, 4, 3, 2 (affine bits), mxfp8, mxfp4, nvfp4, stored "
                             "(the folder as it is, e.g. converted)")
    parser.add_argument("--modes", default="offline,streaming,concurrent",
                        help="of offline, streaming, concurrent, graph, fairness, archive, dual, dialects, "
                             "imports; "
                             "\"load\" alone measures loading only")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (and the archive mode's files)")
    parser.add_argument("--graph-streams", default="1,8,32", help="stream counts of the graph mode")
    parser.add_argument("--upload-seconds", type=float, default=600.0, help="the fairness mode's upload")
    parser.add_argument("--peers", default="", help="comma list of voxmlx,mlx-audio,mistral.rs,transformers or 'all'")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter that has the peers installed")
    parser.add_argument("--peer-timeout", type=float, default=3600.0)
    parser.add_argument("--mistralrs-isq", default="",
                        help="comma list of in_situ_quant settings for mistral.rs, one run each (e.g. none,Q4K; "
                             "none: the checkpoint's bf16)")
    parser.add_argument("--peer-seconds", type=float, help="audio length for the peers (default: the longest length)")
    parser.add_argument("--json", help="write all figures to this JSON file")
    parser.add_argument("--plot", help="write a PNG of RTFx against audio length (needs matplotlib)")
    args = parser.parse_args(argv)

    model = str(random_checkpoint(args.random)) if args.random else (args.model or "mistralai/Voxtral-Mini-4B-Realtime-2602")
    from .loader import load_args, resolve_backend, resolve_path

    path = resolve_path(model)
    model_args = load_args(path)  # any layout; a clear error for a folder that is not a checkpoint
    lengths = [float(x) for x in args.lengths.split(",") if x]
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        if p not in PRECISIONS:
            parser.error(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    modes = [m for m in args.modes.split(",") if m]
    known = ("load", "offline", "streaming", "concurrent", "graph", "fairness", "archive", "dual", "dialects", "imports")
    for m in modes:
        if m not in known:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(known)}")
    try:
        backends = list(dict.fromkeys(resolve_backend(b) for b in args.backends.split(",") if b))
    except VoxtralError as e:
        parser.error(str(e))
    names = list(_PEER_CODE) if args.peers == "all" else [n for n in args.peers.split(",") if n]
    for name in names:
        if name not in _PEER_CODE:
            parser.error(f"unknown peer {name!r}; choose from {', '.join(_PEER_CODE)} or 'all'")
    machine = measure_machine(precisions if modes != ["load"] else [], backends)  # loading uses no matmul figure
    results = []
    spec = {"model": str(path), "lengths": lengths, "audio": args.audio, "streams": args.streams,
            "graph_streams": [int(n) for n in args.graph_streams.split(",") if n],
            "upload_seconds": args.upload_seconds}
    for backend in backends:
        for p in precisions:
            runs = [{**spec, "backend": backend, "precision": p, "modes": [m for m in modes if m != "imports"]}]
            if "imports" in modes:  # the same offline run, with mlx.core imported first
                runs.append({**spec, "backend": backend, "precision": p, "modes": ["offline"],
                             "lengths": [min(lengths)], "import_first": "mlx"})
            for run in runs:
                print(f"benchmarking {backend} {p}{' (mlx.core imported first)' if 'import_first' in run else ''} ...",
                      file=sys.stderr)
                out = _in_subprocess(_worker_command(run), None)
                results.append(out if "precision" in out else {"precision": p, "backend": backend, **out})
    peers = []
    if names:
        seconds = args.peer_seconds or max(lengths)
        with tempfile.TemporaryDirectory() as tmp:
            import soundfile as sf

            wav = os.path.join(tmp, "speech.wav")
            sf.write(wav, speech(seconds, args.audio), SAMPLE_RATE)
            isqs = ["" if q == "none" else q for q in args.mistralrs_isq.split(",")]
            for name in names:
                for isq in isqs if name == "mistral.rs" else [""]:
                    print(f"benchmarking peer {name} {isq} ...", file=sys.stderr)
                    peers.append(run_peer(name, str(path), wav, seconds, args.peer_python, args.peer_timeout, isq))
    bf16_size = bf16_bytes(path)
    print(report(machine, results, peers, model_args, bf16_size))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "bf16_bytes": bf16_size, "machine": machine,
                                               "results": results, "peers": peers}, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
