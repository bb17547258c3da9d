"""mlx_voxtral: Mistral's Voxtral Realtime speech recognition on MLX."""

import warnings

# `python -m mlx_voxtral.convert` runs a module that this package has already imported (for
# the `convert` export, as mlx-lm does); runpy's warning about that is expected and harmless.
warnings.filterwarnings(
    "ignore", message=r"'mlx_voxtral\.convert' found in sys\.modules", category=RuntimeWarning
)

from .audio import load_audio, log_mel_spectrogram  # noqa: E402
from .convert import convert  # noqa: E402
from .exceptions import (  # noqa: E402
    AudioError,
    CheckpointError,
    InvalidRequestError,
    UnsupportedAudioFormatError,
    VoxtralError,
)
from .generate import Batch, async_stream_transcribe, stream_transcribe, transcribe, transcribe_many  # noqa: E402
from .results import Done, FileResult, Segment, StreamReset, TextDelta, Timings, Transcription, Word  # noqa: E402
from .loader import load  # noqa: E402
from .chat import ChatCompletionRequest  # noqa: E402
from .runner import MultimodalArchitecture, Runner, VisionArchitecture, Which  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Runner",
    "Which",
    "ChatCompletionRequest",
    "VisionArchitecture",
    "MultimodalArchitecture",
    "load",
    "convert",
    "Batch",
    "transcribe",
    "transcribe_many",
    "FileResult",
    "stream_transcribe",
    "async_stream_transcribe",
    "Transcription",
    "Timings",
    "TextDelta",
    "Word",
    "Segment",
    "StreamReset",
    "Done",
    "load_audio",
    "log_mel_spectrogram",
    "VoxtralError",
    "AudioError",
    "UnsupportedAudioFormatError",
    "CheckpointError",
    "InvalidRequestError",
]
