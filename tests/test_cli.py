"""The ``mlx-voxtral`` command, run in a subprocess as a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_voxtral
from mlx_voxtral.quantize import quantization_config

from conftest import sox

SRT_BLOCK = re.compile(r"^\d+\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n.+$", re.S)
VTT_CUE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n.+$", re.S)


def user_env(**extra: str) -> dict:
    """The environment a user's shell gives the command (the backend chosen by default)."""
    return {**{k: v for k, v in os.environ.items() if k != "MLX_VOXTRAL_BACKEND"}, **extra}


def cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_voxtral", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=user_env(**(env or {})))


@pytest.fixture(scope="module")
def expected(model_fp32, tiny_checkpoint, speech_5s, speech_40s):
    model = mlx_voxtral.load(tiny_checkpoint)  # what the CLI loads: checkpoint precision
    return {p.stem: mlx_voxtral.transcribe(model, p) for p in (speech_5s, speech_40s)}


def test_transcribe_every_format(tiny_checkpoint, speech_5s, speech_40s, expected, tmp_path):
    for fmt in ("txt", "json", "srt", "vtt"):
        out = tmp_path / fmt
        r = cli("transcribe", str(speech_5s), str(speech_40s), "--model", str(tiny_checkpoint),
                "--format", fmt, "--output-dir", str(out))
        assert r.returncode == 0, r.stderr
        files = sorted(f for f in out.iterdir() if f.name != "voxtral-job.jsonl")  # the job log beside them
        assert [f.name for f in files] == sorted(f"{p.stem}.{fmt}" for p in (speech_5s, speech_40s))
        for f in files:
            text = f.read_text(encoding="utf-8")
            want = expected[f.stem]
            if fmt == "txt":
                assert text == want.text + "\n"
            elif fmt == "json":
                data = json.loads(text)
                assert data["text"] == want.text
                assert data["segments"] and data["words"]
                assert abs(data["duration"] - want.audio_duration) < 1e-3
                for seg in data["segments"]:
                    assert 0 <= seg["start"] <= seg["end"] <= data["duration"] + 1e-3
            elif fmt == "srt":
                blocks = text.strip().split("\n\n")
                assert len(blocks) == len(want.segments)
                for i, block in enumerate(blocks, start=1):
                    assert SRT_BLOCK.match(block) and block.startswith(f"{i}\n"), block
            else:
                assert text.startswith("WEBVTT\n\n")
                cues = text[len("WEBVTT\n\n"):].strip().split("\n\n")
                assert len(cues) == len(want.segments)
                assert all(VTT_CUE.match(c) for c in cues), cues


def test_transcribe_to_stdout(tiny_checkpoint, speech_5s, expected):
    r = cli("transcribe", str(speech_5s), "--model", str(tiny_checkpoint), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected[speech_5s.stem].text + "\n"


def test_quantized_and_delay_options(tiny_checkpoint, speech_5s):
    model = mlx_voxtral.load(tiny_checkpoint, quantize=8)
    want = mlx_voxtral.transcribe(model, speech_5s, delay_ms=960).text
    r = cli("transcribe", str(speech_5s), "--model", str(tiny_checkpoint), "--quantize", "8",
            "--delay-ms", "960", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_quantize_mode_option(tiny_checkpoint, speech_5s, tmp_path):
    """``convert --mode mxfp8`` records the mode in the folder, and ``--quantize 8
    --quantize-mode mxfp8`` transcribes as that folder does (in-situ and converted arrays are
    equal: ``test_quantize``). One second of speech: MLX's CPU fp8 matmul is slow."""
    out = tmp_path / "mxfp8"
    r = cli("convert", "--model", str(tiny_checkpoint), "--out", str(out), "--bits", "8", "--mode", "mxfp8")
    assert r.returncode == 0, r.stderr
    model = mlx_voxtral.load(out, backend="mlx")
    assert model.args.quantization == quantization_config(8, mode="mxfp8")
    second = tmp_path / "one_second.wav"
    sox(str(speech_5s), str(second), "trim", "0", "1")
    want = mlx_voxtral.transcribe(model, second).text
    r = cli("transcribe", str(second), "--model", str(tiny_checkpoint), "--quantize", "8",
            "--quantize-mode", "mxfp8", "--backend", "mlx", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_convert_then_transcribe(tiny_checkpoint, speech_5s, tmp_path):
    out = tmp_path / "q4"
    r = cli("convert", "--model", str(tiny_checkpoint), "--out", str(out), "--bits", "4")
    assert r.returncode == 0, r.stderr
    want = mlx_voxtral.transcribe(mlx_voxtral.load(tiny_checkpoint, quantize=4), speech_5s).text
    r = cli("transcribe", str(speech_5s), "--model", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_listen_from_file_matches_offline(tiny_checkpoint, speech_5s, expected):
    r = cli("listen", "--from-file", str(speech_5s), "--speed", "0", "--model", str(tiny_checkpoint), "--words")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected[speech_5s.stem].text + "\n"
    assert "first text after" in r.stderr
    assert re.search(r"\[\s*\d+\.\d\d - \s*\d+\.\d\d\] \S", r.stderr)


def test_listen_at_real_time_pace(tiny_checkpoint, speech_5s, expected):
    import soundfile as sf

    info = sf.info(str(speech_5s))
    import time

    start = time.perf_counter()
    r = cli("listen", "--from-file", str(speech_5s), "--model", str(tiny_checkpoint), "--speed", "4")
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - start >= info.duration / 4  # paced, not as fast as possible
    assert r.stdout == expected[speech_5s.stem].text + "\n"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["transcribe", "/no/such/file.wav"], 1, "no such file"),
        (["transcribe", "{speech}", "--model", "/no/such/folder"], 1, "checkpoint folder not found"),
        (["transcribe", "{speech}", "--model", "{empty}"], 1, "not a Voxtral Realtime checkpoint"),
        (["transcribe", "{speech}", "--format", "docx"], 2, "invalid choice"),
        (["transcribe", "{speech}", "--quantize", "7"], 2, "invalid choice"),
        (["transcribe", "{speech}", "--quantize-mode", "fp4"], 2, "invalid choice"),
        (["transcribe", "{speech}", "--model", "{ckpt}", "--quantize", "8", "--quantize-mode", "nvfp4"], 1,
         "bits must be 4 in mode nvfp4, got 8"),
        (["transcribe", "{speech}", "--delay-ms", "100", "--model", "{ckpt}"], 1, "delay"),
        (["transcribe", "{corrupt}", "--model", "{ckpt}"], 1, "corrupt.wav"),
        (["transcribe"], 2, "required"),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
        (["listen", "--from-file", "/no/such/file.wav", "--model", "{ckpt}"], 1, "not found"),
        (["convert", "--model", "{ckpt}", "--out", "{tmp}/x", "--bits", "7"], 2, "bits must be 2, 3, 4, 5, 6 or 8"),
        (["transcribe", "{speech}", "--backend", "gpu"], 2, "invalid choice"),
        (["transcribe", "{speech}", "--dtype", "int8"], 2, "invalid choice"),
    ],
)
def test_user_errors(args, code, message, tiny_checkpoint, speech_5s, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    subst = {"{speech}": str(speech_5s), "{ckpt}": str(tiny_checkpoint), "{empty}": str(tmp_path / "empty"),
             "{corrupt}": str(tmp_path / "corrupt.wav")}
    args = [subst.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    r = cli(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_backend_and_dtype_options(tiny_checkpoint, speech_5s):
    """``--backend mlx --dtype float32`` runs the plain MLX modules in float32: the tokens of
    ``load(..., backend="mlx", dtype="float32")``."""
    want = mlx_voxtral.transcribe(mlx_voxtral.load(tiny_checkpoint, backend="mlx", dtype="float32"), speech_5s)
    r = cli("transcribe", str(speech_5s), "--model", str(tiny_checkpoint), "--backend", "mlx", "--dtype", "float32",
            "--quiet", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == want.text
    r = cli("transcribe", str(speech_5s), "--model", str(tiny_checkpoint), "--quiet", env={"MLX_VOXTRAL_BACKEND": "mlx"})
    assert r.returncode == 0 and r.stdout == mlx_voxtral.transcribe(
        mlx_voxtral.load(tiny_checkpoint, backend="mlx"), speech_5s).text + "\n"


def test_one_bad_file_does_not_stop_the_others(tiny_checkpoint, speech_5s, tmp_path, expected):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    r = cli("transcribe", str(bad), str(speech_5s), "--model", str(tiny_checkpoint),
            "--output-dir", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 1
    assert "bad.wav" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "out" / f"{speech_5s.stem}.txt").read_text() == expected[speech_5s.stem].text + "\n"


def test_version_and_help():
    r = cli("--version")
    assert r.returncode == 0 and mlx_voxtral.__version__ in r.stdout
    for command in ("transcribe", "listen", "serve", "convert", "bench"):
        r = cli(command, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (command, r.stderr)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mlx-voxtral"
    if not script.exists():
        pytest.skip("package not installed with its console script")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and mlx_voxtral.__version__ in r.stdout
