"""Audio decoding, down-mixing, resampling and typed errors for bad input."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf
import soxr
from mistral_common.tokens.tokenizers.audio import Audio

from mlx_voxtral import AudioError, UnsupportedAudioFormatError, load_audio
from mlx_voxtral.audio import iter_audio


def _encode_pyav(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Encode mono float samples with PyAV (FFmpeg) into an in-memory file."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame_size = 960 if "opus" in codec else 1024
        for i in range(0, len(samples), frame_size):
            chunk = samples[i : i + frame_size].astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            resampled = av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame)
            for f in resampled:
                for packet in stream.encode(f):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference_16k(speech_5s) -> np.ndarray:
    return load_audio(speech_5s)


def _similar(decoded: np.ndarray, ref: np.ndarray) -> float:
    """Best correlation over small alignment shifts (lossy codecs add priming delay)."""
    best = -1.0
    for shift in range(0, 2000, 8):
        a = decoded[shift : shift + len(ref) - 2000]
        b = ref[: len(a)]
        if len(a) < 1000:
            break
        best = max(best, float(np.corrcoef(a, b)[0, 1]))
    return best


def test_wav_matches_mistral_common_decoding(speech_stereo_44k):
    """Down-mix (channel mean) and soxr HQ resampling as mistral-common does them."""
    ours = load_audio(speech_stereo_44k)
    ref = Audio.from_file(str(speech_stereo_44k), strict=False)
    ref.resample(16000)
    np.testing.assert_array_equal(ours, ref.audio_array.astype(np.float32))


@pytest.mark.parametrize(
    "fmt",
    ["flac", "ogg-vorbis", "ogg-opus", "mp3", "m4a-aac", "webm-opus", "mp3-pyav"],
)
def test_formats_decode(fmt, reference_16k, tmp_path):
    ref = reference_16k
    if fmt == "flac":
        buf = io.BytesIO()
        sf.write(buf, ref, 16000, format="FLAC", subtype="PCM_24")
        data = buf.getvalue()
    elif fmt == "ogg-vorbis":
        buf = io.BytesIO()
        sf.write(buf, ref, 16000, format="OGG", subtype="VORBIS")
        data = buf.getvalue()
    elif fmt == "ogg-opus":
        buf = io.BytesIO()
        sf.write(buf, soxr.resample(ref, 16000, 48000), 48000, format="OGG", subtype="OPUS")
        data = buf.getvalue()
    elif fmt == "mp3":
        buf = io.BytesIO()
        sf.write(buf, soxr.resample(ref, 16000, 44100), 44100, format="MP3")
        data = buf.getvalue()
    elif fmt == "m4a-aac":
        data = _encode_pyav(soxr.resample(ref, 16000, 44100), 44100, "mp4", "aac")
    elif fmt == "webm-opus":
        data = _encode_pyav(soxr.resample(ref, 16000, 48000), 48000, "webm", "libopus")
    else:
        data = _encode_pyav(soxr.resample(ref, 16000, 44100), 44100, "mp3", "libmp3lame")
    path = tmp_path / f"audio.{fmt.split('-')[0]}"
    path.write_bytes(data)
    for source in (path, str(path), f"file://{path}", data, io.BytesIO(data)):
        decoded = load_audio(source)
        assert decoded.dtype == np.float32 and decoded.ndim == 1
        assert abs(len(decoded) - len(ref)) < 0.1 * 16000
        if fmt == "flac":
            np.testing.assert_allclose(decoded, ref, atol=1e-6)
        else:
            assert _similar(decoded, ref) > 0.9


def test_numpy_input_int16_and_stereo(reference_16k):
    pcm = np.round(reference_16k * 32767).astype(np.int16)
    out = load_audio(pcm)
    np.testing.assert_allclose(out, pcm / 32767.0, atol=1e-6)
    stereo = np.stack([reference_16k, 0.5 * reference_16k], axis=1)
    np.testing.assert_allclose(load_audio(stereo), 0.75 * reference_16k, atol=1e-6)
    at_8k = soxr.resample(reference_16k, 16000, 8000)
    assert abs(len(load_audio(at_8k, sample_rate=8000)) - len(reference_16k)) <= 1


def test_blocks_concatenate_to_whole(speech_stereo_44k):
    blocks = list(iter_audio(speech_stereo_44k, block_seconds=0.37))
    assert len(blocks) > 5
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(speech_stereo_44k))
    assert iter_audio(speech_stereo_44k).duration == pytest.approx(4.78, abs=0.1)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_corrupt_and_unsupported(tmp_path, speech_5s):
    with pytest.raises(UnsupportedAudioFormatError, match="could not decode"):
        load_audio(b"this is not audio at all" * 100)
    truncated = speech_5s.read_bytes()[:30]
    with pytest.raises(AudioError):
        load_audio(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UnsupportedAudioFormatError):
        load_audio(text)


def test_empty_audio(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    empty_file = tmp_path / "empty.wav"
    empty_file.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty_file)
    no_samples = tmp_path / "zero.wav"
    sf.write(no_samples, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        load_audio(no_samples)
    with pytest.raises(AudioError, match="empty"):
        load_audio(np.zeros(0, np.float32))


def test_non_finite_samples(tmp_path):
    bad = np.zeros(16000, np.float32)
    bad[100] = np.nan
    bad[200] = np.inf
    with pytest.raises(AudioError, match="2 NaN or infinite"):
        load_audio(bad)
    path = tmp_path / "nan.wav"
    sf.write(path, bad, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(path)
