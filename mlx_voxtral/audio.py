"""Audio front end: decoding, resampling to 16 kHz mono, and the log-mel spectrogram.

``log_mel_spectrogram`` is Voxtral's front end (periodic Hann window, centred reflect-padded
STFT, the last frame dropped, Slaney mel filters, a fixed log floor), returned as
``[frames, n_mels]``. ``LogMelStream`` computes the same frames incrementally.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from functools import lru_cache
from typing import BinaryIO, Optional, Union

import mlx.core as mx
import numpy as np
import soundfile as sf
import soxr

from .exceptions import AudioError, UnsupportedAudioFormatError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
GLOBAL_LOG_MEL_MAX = 1.5
# Sample rates outside these bounds are refused: below, a tiny header can claim hours of
# audio that resampling would blow up (a 1 Hz WAV); above, nothing real is recorded.
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 384000

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray]


def _open_source(source: AudioSource) -> Union[str, io.BytesIO]:
    """A readable path, or the bytes wrapped in a file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
    else:
        path = os.fspath(source)
        if path.startswith("file://"):
            path = path[len("file://") :]
        if not os.path.exists(path):
            raise AudioError(f"audio file not found: {path}")
        if os.path.isdir(path):
            raise AudioError(f"expected an audio file, got a directory: {path}")
        if os.path.getsize(path) == 0:
            raise AudioError(f"the audio file is empty (0 bytes): {path}")
        return path
    if not data:
        raise AudioError("the audio payload is empty (0 bytes)")
    return io.BytesIO(data)


def _mono(block: np.ndarray) -> np.ndarray:
    return block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]


def _soundfile_blocks(src, block_seconds: float):
    """(sample_rate, duration, iterator of mono blocks) via libsndfile, or raise."""
    f = sf.SoundFile(src)

    def blocks():
        with f:
            n = max(1, int(block_seconds * f.samplerate))
            while True:
                try:
                    block = f.read(n, dtype="float32", always_2d=True)
                except Exception as e:
                    raise AudioError("corrupt audio data") from e
                if block.shape[0] == 0:
                    return
                yield _mono(block)

    return f.samplerate, f.frames / f.samplerate if f.frames > 0 else None, blocks()


def _pyav_blocks(src, block_seconds: float):
    """(sample_rate, duration, iterator of mono blocks) via PyAV (FFmpeg), or raise."""
    import av

    container = av.open(src, mode="r")
    if not container.streams.audio:
        container.close()
        raise UnsupportedAudioFormatError("the container has no audio stream")
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or stream.rate
    if not rate:
        container.close()
        raise UnsupportedAudioFormatError("the audio stream has no sample rate")
    duration = float(stream.duration * stream.time_base) if stream.duration else (
        container.duration / 1e6 if container.duration else None
    )
    # Decode to packed float32 at the native rate and layout; down-mix and resample here,
    # exactly as for every other input.
    resampler = av.AudioResampler(format="flt", layout=stream.layout, rate=rate)
    channels = len(stream.layout.channels)

    def blocks():
        target = max(1, int(block_seconds * rate))
        pending, size = [], 0
        try:
            with container:
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        pending.append(out.to_ndarray().reshape(-1, channels))
                        size += pending[-1].shape[0]
                    if size >= target:
                        yield _mono(np.concatenate(pending))
                        pending, size = [], 0
                for out in resampler.resample(None):
                    pending.append(out.to_ndarray().reshape(-1, channels))
        except av.error.FFmpegError as e:
            raise AudioError("corrupt audio data") from e
        if pending:
            yield _mono(np.concatenate(pending))

    return rate, duration, blocks()


def _ffmpeg_blocks(src, block_seconds: float):
    """Whole-file decode through the ffmpeg binary (used only when PyAV is missing)."""
    data = None if isinstance(src, str) else src.getvalue()
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", src if data is None else "pipe:0",
           "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        error = UnsupportedAudioFormatError("ffmpeg could not decode the audio")
        error.details = proc.stderr.decode(errors="replace").strip()
        raise error
    audio = np.frombuffer(proc.stdout, np.float32)
    n = int(block_seconds * SAMPLE_RATE)
    return SAMPLE_RATE, audio.shape[0] / SAMPLE_RATE, (audio[i : i + n] for i in range(0, len(audio), n))


def _open_blocks(source: AudioSource, block_seconds: float):
    src = _open_source(source)
    errors = []
    try:
        return _soundfile_blocks(src, block_seconds)
    except Exception as e:  # libsndfile cannot read it: try a general decoder
        errors.append(f"soundfile: {e}")
    if not isinstance(src, str):
        src.seek(0)
    try:
        return _pyav_blocks(src, block_seconds)
    except ImportError:
        if not shutil.which("ffmpeg"):
            errors.append("PyAV is not installed and ffmpeg is not on PATH")
        else:
            try:
                return _ffmpeg_blocks(src, block_seconds)
            except UnsupportedAudioFormatError as e:
                errors.append(f"ffmpeg: {getattr(e, 'details', e)}")
    except Exception as e:
        errors.append(f"PyAV: {e}")
    # the decoders' own messages (libsndfile's, libav's) stay out of the message, which the
    # server shows to clients; ``details`` keeps them for logs and debugging
    error = UnsupportedAudioFormatError("could not decode the audio (unsupported or corrupt file)")
    error.details = "; ".join(errors)
    raise error


def check_audio(audio: np.ndarray) -> np.ndarray:
    """Reject non-finite samples with a specific message."""
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise AudioError(f"the audio contains {bad} NaN or infinite samples")
    return audio


class AudioBlocks:
    """Iterate over a recording as float32 mono 16 kHz blocks of about ``block_seconds``.

    Files are decoded and resampled (soxr, HQ, streamed: bit-identical to resampling the
    whole signal at once) block by block, so hours of audio never sit in memory at once.
    ``duration`` is the length in seconds when the container tells it, else ``None``.

    Raises ``AudioError`` for missing files, empty audio and NaN/inf samples, and
    ``UnsupportedAudioFormatError`` for data no decoder can read or a sample rate outside
    ``MIN_SAMPLE_RATE`` .. ``MAX_SAMPLE_RATE``.
    """

    def __init__(self, source: AudioSource, block_seconds: float = 30.0, sample_rate: Optional[int] = None):
        if isinstance(source, np.ndarray):
            rate = sample_rate or SAMPLE_RATE
            audio = np.asarray(source)
            if audio.dtype.kind in "iu":
                audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
            audio = audio.astype(np.float32, copy=False)
            if audio.ndim == 1:
                audio = audio[:, None]
            if audio.ndim != 2:
                raise AudioError(f"audio must be 1-D or [samples, channels], got shape {source.shape}")
            n = max(1, int(block_seconds * rate))
            blocks = (_mono(audio[i : i + n]) for i in range(0, audio.shape[0], n))
            duration = audio.shape[0] / rate
        else:
            rate, duration, blocks = _open_blocks(source, block_seconds)
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise UnsupportedAudioFormatError(
                f"the sample rate {rate} Hz is outside the supported {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
            )
        self.sample_rate = rate
        self.duration = duration
        self._blocks = blocks
        self._resampler = (
            soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if rate != SAMPLE_RATE else None
        )
        self._samples = 0
        self._done = False

    def __iter__(self) -> "AudioBlocks":
        return self

    def __next__(self) -> np.ndarray:
        while not self._done:
            block = next(self._blocks, None)
            if block is None:
                self._done = True
                if self._resampler is not None:
                    out = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                else:
                    out = np.zeros(0, np.float32)
                if self._samples + out.shape[0] == 0:
                    raise AudioError("the audio is empty (0 samples)")
            else:
                check_audio(block)
                out = block if self._resampler is None else self._resampler.resample_chunk(block)
            if out.shape[0]:
                self._samples += out.shape[0]
                return out.astype(np.float32, copy=False)
        raise StopIteration


def iter_audio(source: AudioSource, block_seconds: float = 30.0, sample_rate: Optional[int] = None) -> AudioBlocks:
    """``AudioBlocks`` over ``source`` (path, ``file://`` URL, bytes, file object or array)."""
    return AudioBlocks(source, block_seconds, sample_rate)


def probe_duration(path: Union[str, os.PathLike]) -> Optional[float]:
    """Seconds of audio in the file at ``path`` from its header (no decoding), or None when
    the container does not say or no decoder can read it."""
    try:
        info = sf.info(os.fspath(path))
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:  # not a libsndfile format: ask FFmpeg
        pass
    try:
        import av

        with av.open(os.fspath(path), mode="r") as container:
            streams = container.streams.audio
            if streams and streams[0].duration:
                return float(streams[0].duration * streams[0].time_base)
            return container.duration / 1e6 if container.duration else None
    except Exception:
        return None


def load_audio(source: AudioSource, sample_rate: Optional[int] = None) -> np.ndarray:
    """Load a whole recording as float32 mono 16 kHz.

    Args:
        source: a path (or ``file://`` URL), encoded bytes, a binary file-like object, or
            a numpy array of samples (``[n]`` or ``[n, channels]``; ``sample_rate`` gives
            its rate, default 16 kHz).

    Raises:
        AudioError: missing file, empty audio, NaN/inf samples, corrupt data.
        UnsupportedAudioFormatError: a container no decoder can read.
    """
    return np.concatenate(list(iter_audio(source, sample_rate=sample_rate)))


@lru_cache(maxsize=None)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised mel filterbank ``[n_fft // 2 + 1, n_mels]`` (mistral-common's)."""
    from mistral_common.audio import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_bins=n_mels,
        min_frequency=0.0,
        max_frequency=sample_rate / 2,
        sampling_rate=sample_rate,
    )
    return np.ascontiguousarray(fb, np.float32)


@lru_cache(maxsize=None)
def hann_window(n_fft: int = N_FFT) -> np.ndarray:
    """Periodic Hann window (``torch.hann_window`` default)."""
    return np.hanning(n_fft + 1)[:-1].astype(np.float32)


def _log_mel_frames(
    padded: np.ndarray, n_frames: int, n_mels: int, n_fft: int, hop_length: int,
    global_log_mel_max: float | None,
) -> np.ndarray:
    """Log-mel ``[n_frames, n_mels]`` (float32) of frames ``j < n_frames`` of an already padded
    signal (frame j starts at ``hop_length * j``). On the host, in numpy: a stream's frames
    never wait on the accelerator, and offline and live compute them alike."""
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length][:n_frames]
    spec = np.fft.rfft(frames * hann_window(n_fft), axis=-1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    # einsum, not @: numpy's matmul (its BLAS) sums a single frame differently from many, and
    # a stream's frames must not depend on how many arrive at once
    mel = np.einsum("fb,bm->fm", power, mel_filters(n_mels, n_fft))
    log_spec = np.log10(np.maximum(mel, np.float32(1e-10)))
    floor = (global_log_mel_max if global_log_mel_max is not None else log_spec.max()) - 8.0
    return ((np.maximum(log_spec, np.float32(floor)) + 4.0) / 4.0).astype(np.float32)


def log_mel_spectrogram(
    audio: Union[np.ndarray, mx.array],
    n_mels: int = N_MELS,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    global_log_mel_max: float | None = GLOBAL_LOG_MEL_MAX,
) -> mx.array:
    """Log-mel spectrogram ``[len // hop_length, n_mels]`` of 16 kHz float32 audio.

    Centred STFT with reflect padding, power spectrum, the last frame dropped, mel
    projection, ``log10`` floored at ``global_log_mel_max - 8``, then ``(x + 4) / 4``.
    """
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    pad = n_fft // 2
    if x.shape[0] <= pad:
        raise AudioError(f"audio too short for the STFT: {x.shape[0]} samples, need > {pad}")
    x = np.concatenate([x[1 : pad + 1][::-1], x, x[-pad - 1 : -1][::-1]])
    n_frames = (x.shape[0] - n_fft) // hop_length  # 1 + len // hop, minus the dropped frame
    return mx.array(_log_mel_frames(x, n_frames, n_mels, n_fft, hop_length, global_log_mel_max))


class LogMelStream:
    """Incremental ``log_mel_spectrogram`` on the global frame grid (numpy in, numpy out).

    Frame j is centred on sample ``hop_length * j`` of the stream, exactly as offline. The
    stream must start with silence at least ``n_fft // 2`` samples long (Voxtral's left pad
    guarantees it), so the offline reflect padding at the start is zeros too.
    """

    def __init__(
        self,
        n_mels: int = N_MELS,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        global_log_mel_max: float | None = GLOBAL_LOG_MEL_MAX,
    ):
        if global_log_mel_max is None:
            raise ValueError("streaming log-mel needs a fixed global_log_mel_max")
        self.n_mels, self.n_fft, self.hop_length = n_mels, n_fft, hop_length
        self.global_log_mel_max = global_log_mel_max
        self._buffer = np.zeros(n_fft // 2, np.float32)
        self.frames = 0  # frames emitted so far

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Append samples; return every newly complete frame ``[n, n_mels]``."""
        self._buffer = np.concatenate([self._buffer, np.asarray(samples, np.float32)])
        n = (self._buffer.shape[0] - self.n_fft) // self.hop_length + 1
        if n <= 0:
            return np.zeros((0, self.n_mels), np.float32)
        out = _log_mel_frames(
            self._buffer[: (n - 1) * self.hop_length + self.n_fft],
            n, self.n_mels, self.n_fft, self.hop_length, self.global_log_mel_max,
        )
        self._buffer = self._buffer[n * self.hop_length :]
        self.frames += n
        return out
