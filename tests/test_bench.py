"""The benchmark script runs end to end and reports every figure (its speed is not tested)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_reports_all_modes_and_failing_peers(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model", str(tiny_checkpoint),
         "--lengths", "2,4", "--precisions", "bf16,4", "--streams", "2", "--json", str(out),
         "--peers", "no-such-peer-check,voxmlx", "--peer-python", sys.executable, "--peer-timeout", "120"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    # an unknown peer name is a usage error, reported before anything runs
    assert r.returncode == 2 and "unknown peer" in r.stderr
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model", str(tiny_checkpoint),
         "--lengths", "2,4", "--precisions", "bf16,4", "--streams", "2", "--json", str(out),
         "--peers", "voxmlx", "--peer-python", sys.executable, "--peer-timeout", "120"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["memory_bandwidth_gbs"] > 0
    assert data["machine"]["matmul_gflops"]["fp32"] > 0
    assert [x["precision"] for x in data["results"]] == ["bf16", "4"]
    for x in data["results"]:
        assert x["load_s"] > 0 and x["weights_gb"] > 0 and x["peak_rss_gb"] >= x["rss_after_load_gb"]
        assert set(x["offline"]) == {"2.0", "4.0"}
        for o in x["offline"].values():
            assert o["rtf"] > 0 and o["decode_ms_per_token"] > 0 and o["encoder_s_per_audio_s"] > 0
        assert x["streaming"]["first_text_s_from_start"] is None or x["streaming"]["first_text_s_from_start"] > 0
        assert x["streaming"]["event_latency_p50_s"] >= 0
        assert x["concurrent"]["streams"] == 2 and x["concurrent"]["batched_tokens_per_s"] > 0
    # a peer that cannot run is reported with its error, not skipped
    (peer,) = data["peers"]
    assert peer["peer"] == "voxmlx" and (peer.get("error") or peer.get("rtf"))
    assert "(bound)" in r.stdout and "voxmlx" in r.stdout
