"""Position-to-time formula, word grouping and the transcript writers."""

from __future__ import annotations

import json
import re

import pytest

from mlx_voxtral.session import Session
from mlx_voxtral.timestamps import Segment, Word, WordTracker, segments_from_words, token_start
from mlx_voxtral.writers import format_timestamp, render, to_srt, to_vtt


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_token_times_from_positions(model_fp32, delay_ms):
    """Feed a constructed token sequence: "Hello world, again" at chosen positions."""
    d = delay_ms // 80
    session = Session(model_fp32, delay_ms=delay_ms)
    session.push([0.0] * 16000 * 10)  # 10 s of audio, so no time is clamped
    tok = model_fp32.tokenizer
    hello, world, comma, again = (tok.tekken.encode(t, bos=False, eos=False) for t in ("Hello", " world", ",", " again"))
    assert len(hello) == len(world) == len(comma) == len(again) == 1
    L = 33 + d  # prompt length; the first output comes from position L - 1
    seq = {L - 1: 32, L: hello[0], L + 1: 32, L + 2: 32, L + 3: world[0], L + 4: comma[0],
           L + 5: 33, L + 6: 32, L + 7: again[0]}
    for p in range(L - 1, L + 8):
        session.on_token(seq[p], p)
    session.finish()
    words = session.words + ([session._tracker.flush()] if session._tracker._start is not None else [])

    def t(p):  # the documented formula: (p + 1 - d - 32) * 0.08
        return round((p + 1 - d - 32) * 0.08, 3)

    assert t(L - 1) == 0.08  # the first output slot is aligned with 80 ms of real audio
    assert [w.text for w in words] == ["Hello", "world,", "again"]
    assert (words[0].start, words[0].end) == (t(L), round(t(L) + 0.08, 3))
    assert (words[1].start, words[1].end) == (t(L + 3), round(t(L + 4) + 0.08, 3))
    # [STREAMING_WORD] at L + 5 opens the next word at its own slot
    assert (words[2].start, words[2].end) == (t(L + 5), round(t(L + 7) + 0.08, 3))
    assert token_start(L + 3, d) == pytest.approx(t(L + 3))


def test_word_tracker_multibyte_and_whitespace():
    tracker = WordTracker()
    assert tracker.add(" Gr", 1.0) is None
    assert tracker.add("", 1.08) is None  # half of a character: extends the word
    assert tracker.add("üße", 1.16) is None
    word = tracker.add(" dir", 1.6)
    assert word == Word("Grüße", 1.0, 1.24)
    assert tracker.add(" ", 2.0) == Word("dir", 1.6, 1.68)  # a space ends the word
    assert tracker.add(" ", 2.08) is None
    assert tracker.flush() is None


def test_segments_split_at_pauses_and_sentence_ends():
    words = [Word("Hello", 0.0, 0.4), Word("there.", 0.5, 0.9), Word("How", 1.0, 1.2),
             Word("are", 1.3, 1.5), Word("you", 3.0, 3.2)]
    segs = segments_from_words(words)
    assert [s.text for s in segs] == ["Hello there.", "How are", "you"]
    assert (segs[1].start, segs[1].end) == (1.0, 1.5)
    long = [Word(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(100)]
    assert all(s.end - s.start <= 12.0 and len(s.words) <= 40 for s in segments_from_words(long))


class _Result:
    text = "Hello there. How are you"
    audio_duration = 3.5
    delay_ms = 480
    finish_reason = "end_of_audio"
    words = [Word("Hello", 0.0, 0.4), Word("there.", 0.5, 0.9), Word("How", 3661.0, 3661.2)]
    segments = [Segment("Hello there.", 0.0, 0.9, words[:2]), Segment("How", 3661.0, 3661.2, words[2:])]


def test_timestamps_format():
    assert format_timestamp(3661.2345) == "01:01:01.234"
    assert format_timestamp(0.0016, ",") == "00:00:00,002"


def test_writers():
    r = _Result()
    assert render(r, "txt") == "Hello there. How are you\n"
    data = json.loads(render(r, "json"))
    assert data["text"] == r.text and len(data["segments"]) == 2
    assert data["segments"][0]["words"][1] == {"text": "there.", "start": 0.5, "end": 0.9}
    srt = render(r, "srt")
    blocks = srt.strip().split("\n\n")
    assert len(blocks) == 2
    for i, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        assert lines[0] == str(i)
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", lines[1])
    assert "01:01:01,000 --> 01:01:01,200" in srt
    vtt = render(r, "vtt")
    assert vtt.startswith("WEBVTT\n\n")
    cues = vtt.split("\n\n")[1:]
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n", c) for c in cues if c)
    with pytest.raises(ValueError, match="unknown format"):
        render(r, "docx")


def test_cue_text_stays_one_line():
    """Decoded text may hold newlines (or "-->"): a cue must not, or the file breaks."""
    seg = Segment("one\n\ntwo --> three\r\n", 1.0, 2.0, [])
    for fmt, to in (("srt", to_srt), ("vtt", to_vtt)):
        out = to([seg])
        cue = out.split("\n\n")[-1] if fmt == "vtt" else out
        assert cue.strip().split("\n")[-1] == "one two -> three"
        assert out.count("-->") == 1
