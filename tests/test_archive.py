"""Archive jobs: ``transcribe_many``, and ``mlx-voxtral transcribe`` over many files,
resumed after a kill and shared out among processes by ``mlx.launch``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SENTENCES, espeak
from test_cli import cli, user_env

import mlx_voxtral
from mlx_voxtral.archive import Found, collect, outputs, shard
from mlx_voxtral.exceptions import InvalidRequestError, VoxtralError
from mlx_voxtral.generate import transcribe_many


def test_collect_folders_globs_and_lists(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.wav", "a/deep/2.flac", "a/notes.txt", "b.mp3", "c.ogg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# the rest\nb.mp3\n\n  c.ogg\nb.mp3\n")
    got = collect([str(tmp_path / "a"), f"@{tmp_path / 'list.txt'}", str(tmp_path / "*.mp3")])
    assert [f.path for f in got] == [tmp_path / p for p in ("a/1.wav", "a/deep/2.flac", "b.mp3", "c.ogg")]
    assert [str(f.name) for f in got] == ["1.wav", "deep/2.flac", "b.mp3", "c.ogg"]  # relative to what found it
    assert [(f.path, str(f.name)) for f in collect([str(tmp_path / "**" / "*.flac")])] == [
        (tmp_path / "a/deep/2.flac", "a/deep/2.flac")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("# nothing\n")
    for inputs, message in (([str(tmp_path / "nope.wav")], "no such file"),
                            ([str(tmp_path / "*.opus")], "no files match"),
                            ([str(tmp_path / "empty")], "no audio files in"),
                            ([f"@{tmp_path / 'blank.txt'}"], "names no files"),
                            ([f"@{tmp_path / 'missing.txt'}"], "no such list file")):
        with pytest.raises(VoxtralError, match=message):
            collect(inputs)


def test_outputs_mirror_the_tree_and_never_collide(tmp_path):
    files = [Found(Path("/x/talk.wav"), Path("talk.wav")), Found(Path("/x/talk.mp3"), Path("talk.mp3")),
             Found(Path("/x/y/talk.wav"), Path("y/talk.wav")), Found(Path("/elsewhere/z.flac"), Path("z.flac"))]
    assert outputs(files, Path("/out"), "srt") == [
        Path("/out/talk.wav.srt"), Path("/out/talk.mp3.srt"), Path("/out/y/talk.srt"), Path("/out/z.srt")]
    with pytest.raises(VoxtralError, match="would write the same output: /a/t.wav, /b/t.wav"):
        outputs([Found(Path("/a/t.wav"), Path("t.wav")), Found(Path("/b/t.wav"), Path("t.wav"))], Path("/o"), "txt")


def test_shard_balances_audio_longest_first():
    durations = [10.0, 1.0, 7.0, 3.0, 3.0, 6.0]
    shares = shard(durations, 2)
    assert sorted(i for s in shares for i in s) == list(range(6))  # every file exactly once
    assert shares == [[0, 3, 4], [2, 5, 1]]  # 16 s and 14 s
    assert shard(durations, 1) == [[0, 2, 5, 3, 4, 1]]
    assert shard([], 3) == [[], [], []]


def test_transcribe_many_equals_transcribe(fp32, speech_5s, speech_40s, speech_stereo_44k, silence_2s, tmp_path):
    """Files decoded together (40 s: more than one block; 44.1 kHz stereo: resampled) give the
    tokens ``transcribe`` gives each alone; an unreadable file is retried once, then reported,
    and the others finish."""
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt not audio")
    sources = [speech_40s, bad, speech_5s, silence_2s, speech_stereo_44k]
    seen = []
    results = list(transcribe_many(fp32, sources, batch_size=3, progress=seen.append))
    assert sorted(r.index for r in results) == list(range(len(sources)))
    by_index = {r.index: r for r in results}
    assert not by_index[1].ok and by_index[1].attempts == 2 and by_index[1].result is None
    assert isinstance(by_index[1].error, mlx_voxtral.AudioError)
    for i, source in enumerate(sources):
        if i == 1:
            continue
        r = by_index[i]
        assert r.ok and r.attempts == 1 and r.source == source and r.wall_seconds > 0
        want = mlx_voxtral.transcribe(fp32, source)
        assert r.result.token_ids == want.token_ids, source.name
        assert r.result.text == want.text and r.result.segments == want.segments
    good = sum(by_index[i].result.audio_duration for i in by_index if i != 1)
    assert sum(seen) == pytest.approx(good, abs=1e-3)  # progress adds up to the audio read
    assert [r.index for r in transcribe_many(fp32, [speech_5s], batch_size=1)] == [0]
    assert list(transcribe_many(fp32, [])) == []
    with pytest.raises(InvalidRequestError, match="delay"):
        next(transcribe_many(fp32, [speech_5s], delay_ms=100))
    with pytest.raises(InvalidRequestError, match="batch_size"):
        next(transcribe_many(fp32, [speech_5s], batch_size=0))


# the command over an archive ------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Eight spoken files in two folders."""
    root = tmp_path_factory.mktemp("archive")
    (root / "day2").mkdir()
    for i, text in enumerate(SENTENCES[:8]):
        espeak(text, root / ("day2" if i >= 4 else "") / f"talk{i}.wav")
    return root


@pytest.fixture(scope="module")
def one_process(archive, tiny_checkpoint, tmp_path_factory) -> dict:
    """The job's outputs from one process: relative path -> text."""
    out = tmp_path_factory.mktemp("one")
    r = cli("transcribe", str(archive), "--model", str(tiny_checkpoint), "--output-dir", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert "8 transcribed" in r.stderr
    return read_outputs(out)


def read_outputs(out: Path) -> dict:
    assert not list(out.rglob("*.partial")), "a partial output was left behind"
    return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*.json")}


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "voxtral-job.jsonl").read_text().splitlines()]


def test_outputs_equal_offline_transcribe(one_process, archive, tiny_checkpoint):
    model = mlx_voxtral.load(tiny_checkpoint)
    assert sorted(one_process) == sorted(f"{'day2/' if i >= 4 else ''}talk{i}.json" for i in range(8))
    for name, text in one_process.items():
        assert json.loads(text)["text"] == mlx_voxtral.transcribe(model, archive / name.replace(".json", ".wav")).text


def test_mlx_launch_shares_the_job_out(archive, tiny_checkpoint, one_process, tmp_path):
    """``mlx.launch -n 2`` (ring backend on localhost): the outputs of one process, each file
    transcribed exactly once, by one of the two ranks, and one log gathered by rank 0."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    out = tmp_path / "out"
    r = subprocess.run([str(launcher), "-n", "2", "--", sys.executable, "-m", "mlx_voxtral", "transcribe",
                        str(archive), "--model", str(tiny_checkpoint), "--output-dir", str(out), "--format", "json"],
                       capture_output=True, text=True, timeout=300, env=user_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_outputs(out) == one_process
    log = read_log(out)
    assert sorted(e["file"] for e in log) == sorted(str(archive / name.replace(".json", ".wav")) for name in one_process)
    assert {e["status"] for e in log} == {"done"}
    assert {e["rank"] for e in log} == {0, 1}  # both ranks did a share
    assert "[rank 1]" in r.stdout + r.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_interrupted_job_resumes(sig, archive, tiny_checkpoint, one_process, tmp_path):
    """A job killed (or Ctrl-C'd) after its first output leaves only complete outputs;
    ``--resume`` finishes it with the outputs of an uninterrupted job, transcribing each
    remaining file once and none that was done."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mlx_voxtral", "transcribe", str(archive), "--model", str(tiny_checkpoint),
            "--output-dir", str(out), "--format", "json", "--batch-size", "1"]
    # The job gets Ctrl-C's default action even where the tests run with SIGINT ignored (a
    # background job of a shell, as CI may run them), runs at the lowest priority and is
    # stopped as soon as it reports its first output, so a busy machine cannot let it finish.
    def child_setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.nice(19)

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user_env(),
                            preexec_fn=child_setup)
    seen = []
    while proc.poll() is None and not any(" -> " in line for line in seen):
        seen.append(proc.stderr.readline())
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "--resume" in stderr and "Traceback" not in stderr
    first = read_outputs(out)
    assert 1 <= len(first) < 8, "the job was not stopped midway"
    assert all(one_process[name] == text for name, text in first.items())
    before = len(read_log(out))
    r = cli(*args[3:], "--resume")
    assert r.returncode == 0, r.stderr
    assert read_outputs(out) == one_process
    resumed = read_log(out)[before:]
    assert sorted(e["output"] for e in resumed) == sorted(str(out / name) for name in one_process)
    assert {e["output"] for e in resumed if e["status"] == "skipped"} == {str(out / name) for name in first}
    assert {e["output"] for e in resumed if e["status"] == "done"} == {str(out / n) for n in one_process if n not in first}


def test_job_errors(archive, tiny_checkpoint, tmp_path):
    r = cli("transcribe", str(archive), "--model", str(tiny_checkpoint), "--resume")
    assert r.returncode == 1 and "--resume needs --output-dir" in r.stderr
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    r = cli("transcribe", str(tmp_path / "bad.wav"), str(archive / "talk0.wav"), "--model", str(tiny_checkpoint),
            "--output-dir", str(tmp_path / "out"), "--format", "json")
    assert r.returncode == 1 and "bad.wav" in r.stderr and "after 2 attempts" in r.stderr
    assert "Traceback" not in r.stderr
    log = {Path(e["file"]).name: e for e in read_log(tmp_path / "out")}
    assert log["bad.wav"]["status"] == "failed" and log["bad.wav"]["attempts"] == 2 and log["bad.wav"]["error"]
    assert log["talk0.wav"]["status"] == "done" and log["talk0.wav"]["audio_seconds"] > 0
