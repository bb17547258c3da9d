"""Dual delay: a faster-delay session follows a slower one over one encoder pass.

The encoder does not depend on the delay (the left pad is a fixed 32 tokens, the encoder
is causal, the delay conditions the decoder only), so a follower fed its leader's audio
embeddings must give exactly what it gives alone, while the encoder runs once.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx_voxtral
from mlx_voxtral.audio import load_audio
from mlx_voxtral.generate import Batch, result
from mlx_voxtral.results import Provisional, ProvisionalText, StreamReset, TextDelta
from mlx_voxtral.session import Session


def _run(model, audio: np.ndarray, delays: tuple[int, ...], follow: bool, chunk: int = 1000,
         encode_tokens=None):
    """Sessions at ``delays`` in one batch, fed ``audio`` in chunks; the first leads when
    ``follow``. Returns the sessions, their events and the batch."""
    batch = Batch(model, encode_tokens)
    sessions = [Session(model, d) for d in delays]
    batch.add(sessions[0])
    for s in sessions[1:]:
        batch.add(s, follows=sessions[0] if follow else None)
    events = {s: [] for s in sessions}

    def drain():
        for s, evs in batch.drain().items():
            events[s] += evs

    for i in range(0, len(audio), chunk):
        for s in sessions:
            s.push(audio[i : i + chunk])
        drain()
    for s in sessions:
        s.finish()
    drain()
    return sessions, events, batch


@pytest.mark.parametrize("encode_tokens", [None, 3])
def test_follower_equals_its_delay_alone_at_one_encoder_pass(fp32, speech_5s, encode_tokens):
    """Also when the leader encodes a few tokens at a time (as beside a long upload), and
    its longer right pad outlasts the follower's audio."""
    audio = load_audio(speech_5s)
    (slow, fast), _, shared = _run(fp32, audio, (720, 160), follow=True, encode_tokens=encode_tokens)
    (alone,), _, single = _run(fp32, audio, (720,), follow=False, encode_tokens=encode_tokens)
    assert result(slow).token_ids == mlx_voxtral.transcribe(fp32, audio, delay_ms=720).token_ids
    assert result(fast).token_ids == mlx_voxtral.transcribe(fp32, audio, delay_ms=160).token_ids
    assert slow.done and fast.done
    assert shared.encoded_tokens == single.encoded_tokens  # the follower never ran the encoder
    (_, _), _, separate = _run(fp32, audio, (720, 160), follow=False)
    assert separate.encoded_tokens > shared.encoded_tokens


def test_restarts_keep_the_leader_exact(eos_model, speech_5s):
    """EOS mid-audio restarts both decoders: the leader's ids stay those of its delay alone;
    a follower restarts on its leader's new stream, or alone after its own EOS."""
    audio = load_audio(speech_5s)
    (slow, fast), events, _ = _run(eos_model, audio, (480, 160), follow=True, chunk=1280)
    want = mlx_voxtral.transcribe(eos_model, audio, delay_ms=480)
    assert want.resets >= 1
    assert result(slow).token_ids == want.token_ids and slow.done and fast.done
    reasons = {e.reason for e in events[fast] if isinstance(e, StreamReset)}
    assert "leader" in reasons


def test_follower_rules(fp32):
    batch = Batch(fp32)
    leader, other = Session(fp32, 480), Session(fp32, 160)
    with pytest.raises(ValueError, match="leader of this batch"):
        batch.add(other, follows=leader)
    batch.add(leader)
    leader.push(np.zeros(16000, np.float32))
    batch.step()
    other.push(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="before any audio is encoded"):
        batch.add(other, follows=leader)
    late = Session(fp32, 160)
    batch.add(late)
    follower = Session(fp32, 160)
    fresh = Session(fp32, 800)
    batch.add(fresh)
    batch.add(follower, follows=fresh)
    with pytest.raises(ValueError, match="not another follower"):
        batch.add(Session(fp32, 80), follows=follower)
    batch.remove(fresh)  # its follower goes with it
    assert follower not in batch.sessions and late in batch.sessions


def test_provisional_text_is_the_fast_text_past_the_decided_audio():
    p = ProvisionalText()
    p.add([TextDelta(" hello", 0.4), TextDelta(" wor", 0.8), TextDelta("ld", 0.88)])
    assert p.update(0.0, started=False) == "hello world"
    assert p.update(0.0, started=False) is None  # unchanged: nothing to send
    assert p.update(0.5, started=True) == " world"
    assert p.update(0.8, started=True) == "ld"
    p.add([StreamReset("leader", 1.0), TextDelta(" again ", 1.2)])
    assert p.update(1.0, started=True) == " again"
    assert p.update(2.0, started=True) == ""
    assert Provisional("x").text == "x"
