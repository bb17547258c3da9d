"""The benchmark script runs end to end and reports every figure (its speed is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

from mlx_voxtral import bench

from conftest import ROOT


def _bench(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd)


def test_bench_reports_every_mode_and_failing_peers(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    common = ["--model", str(tiny_checkpoint), "--lengths", "2", "--precisions", "bf16", "--json", str(out)]
    # an unknown peer, mode or backend is a usage error, reported before anything runs
    for bad, message in [(["--peers", "no-such-peer"], "unknown peer"), (["--modes", "offline,speed"], "unknown mode"),
                         (["--backends", "gpu"], "backend must be one of")]:
        r = _bench(*common, *bad, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    modes = "offline,streaming,concurrent,graph,fairness,imports"
    r = _bench(*common, "--backends", "cpu,mlx", "--modes", modes, "--streams", "2", "--graph-streams", "1,2",
               "--upload-seconds", "8", "--peers", "voxmlx", "--peer-python", sys.executable, "--peer-timeout", "120",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["memory_bandwidth_gbs"] > 0
    assert set(data["machine"]["matmul_gflops"]) == {"cpu", "mlx"}
    runs = [(x["backend"], x["import_first"]) for x in data["results"]]
    assert runs == [("cpu", "mlx_voxtral"), ("cpu", "mlx"), ("mlx", "mlx_voxtral"), ("mlx", "mlx")]
    for x in data["results"]:
        assert x["load_s"] > 0 and x["weights_gb"] > 0 and x["peak_rss_gb"] >= x["rss_after_load_gb"]
        (o,) = x["offline"].values()
        assert o["rtfx"] > 0 and o["decode_ms_per_token"] > 0 and o["encoder_s_per_audio_s"] > 0
        if x["import_first"] == "mlx":
            continue
        s = x["streaming"]
        assert s["rtfx"] > 0 and s["event_latency_p50_s"] >= 0 and s["host_syncs_per_chunk_mean"] >= 1
        assert x["concurrent"]["streams"] == 2 and x["concurrent"]["batched_tokens_per_s"] > 0
        assert set(x["graph"]["build_ms_per_decode_step"]) == {"1", "2"}
        assert x["fairness"]["alone_p95_s"] > 0 and x["fairness"]["with_upload_p95_s"] > 0
    mlx = data["results"][2]
    assert mlx["streaming"]["host_syncs_per_chunk_max"] == 1  # the token read, nothing else
    # a peer that cannot run is reported with its error, not skipped
    (peer,) = data["peers"]
    assert peer["peer"] == "voxmlx" and (peer.get("error") or peer.get("rtfx"))
    for text in ("(bound)", "voxmlx", "host syncs per chunk", "graph building per decode step",
                 "beside a 8.0 s upload", "import mlx.core first"):
        assert text in r.stdout, text


def test_peers_are_compared_at_matching_precision():
    """Each mistral.rs run is set against our offline run at the precision its in-situ
    quantization matches, at the same audio length; a failed peer is not compared."""
    results = [{"backend": "cpu", "precision": p, "offline": {"60.0": {"rtfx": x}}} for p, x in (("4", 1.2), ("bf16", 0.5))]
    peers = [{"peer": "mistral.rs", "precision": "ISQ as given (Q4K)", "matches": bench.MISTRALRS_MATCH["Q4K"],
              "audio_s": 60.0, "rtfx": 0.5},
             {"peer": "mistral.rs", "precision": "ISQ as given", "matches": bench.MISTRALRS_MATCH[""], "audio_s": 60.0,
              "rtfx": 0.125},
             {"peer": "mistral.rs", "precision": "ISQ as given (Q8_0)", "matches": "8", "audio_s": 60.0, "error": "x"}]
    lines = bench.matched(results, peers)
    assert len(lines) == 2
    assert lines[0].endswith("cpu 4 RTFx 1.2 vs mistral.rs [ISQ as given (Q4K)] 0.5: 2.40x")
    assert lines[1].endswith("cpu bf16 RTFx 0.5 vs mistral.rs [ISQ as given] 0.125: 4.00x")


def test_matmul_probe_multiplies_the_precision_it_names():
    """The machine's matmul figures (the encoder's bound) come from a layer in the named
    precision: quantized widths are quantized layers (a bare Linear given to nn.quantize
    stays float, which had every width measure float32)."""
    import mlx.core as mx
    import mlx.nn as nn

    for precision, bits in (("4", 4), ("8", 8), ("mxfp4", 4)):
        layer = bench.probe_layer(precision, 256, 64)
        assert isinstance(layer, nn.QuantizedLinear) and layer.bits == bits
    assert bench.probe_layer("bf16", 256, 64).weight.dtype == mx.bfloat16


def test_kernel_timings_run_the_live_encoder_shapes(tmp_path):
    """``benchmarks/kernels.py`` (the live chunk's encoder kernels, timed) runs end to end as a
    user runs it and reports both ways of reading the weights and every query count asked for.
    (Run as a script: an installed package named ``kernels`` would shadow it on import.)"""
    from conftest import require_cpu_backend

    require_cpu_backend()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--layers", "2", "--dim", "128",
                        "--hidden", "256", "--heads", "2", "--window", "40", "--queries", "1,4", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    mm, att = r.stdout.splitlines()
    assert mm.startswith("2 layers' 4-bit matmuls, 4 rows: per call ") and ", laid out " in mm
    assert att.startswith("2 layers' chunked attention over 40 keys: 1 queries ") and ", 4 queries " in att


def test_breakdown_times_every_stage(tiny_checkpoint, tmp_path):
    """``benchmarks/breakdown.py`` times the kernels of an offline run per decode step and of
    a live stream per chunk, as a user runs it."""
    from conftest import require_cpu_backend

    require_cpu_backend()
    for mode, unit, stages in (("offline", "ms/decode step", ("matmuls[1]", "attention_one", "decoder", "rope")),
                               ("streaming", "ms/chunk", ("encoder", "cache extend", "attention", "conv stem"))):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "breakdown.py"), "--model", str(tiny_checkpoint),
                            "--precision", "4", "--mode", mode, "--seconds", "3"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        head, columns, *rows = r.stdout.splitlines()
        assert ("ms per step" if mode == "offline" else "ms per chunk") in head and unit in columns
        names = {row[:16].strip() for row in rows}
        assert set(stages) <= names, (mode, names)
