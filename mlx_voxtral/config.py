"""Model arguments parsed from Mistral's native ``params.json`` (or mlx-audio's ``config.json``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional


class _FromDict:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        """Build from a dict, ignoring keys this dataclass does not know."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class AudioEncodingArgs(_FromDict):
    sampling_rate: int = 16000
    frame_rate: float = 12.5
    num_mel_bins: int = 128
    hop_length: int = 160
    window_size: int = 400
    global_log_mel_max: Optional[float] = 1.5
    chunk_length_s: Optional[float] = None
    transcription_format: str = "streaming"


@dataclass
class EncoderArgs(_FromDict):
    dim: int = 1280
    n_layers: int = 32
    head_dim: int = 64
    hidden_dim: int = 5120
    n_heads: int = 32
    n_kv_heads: int = 32
    use_biases: bool = True
    rope_theta: float = 1e6
    causal: bool = True
    norm_eps: float = 1e-5
    sliding_window: int = 750
    pos_embed: str = "rope"
    ffn_type: str = "swiglu"
    norm_type: str = "rms_norm"
    audio_encoding_args: AudioEncodingArgs = field(default_factory=AudioEncodingArgs)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "EncoderArgs":
        args = super().from_dict({k: v for k, v in params.items() if k != "audio_encoding_args"})
        args.audio_encoding_args = AudioEncodingArgs.from_dict(params.get("audio_encoding_args", {}))
        return args


@dataclass
class ModelArgs(_FromDict):
    """Decoder hyper-parameters plus the nested audio encoder arguments."""

    dim: int = 3072
    n_layers: int = 26
    head_dim: int = 128
    hidden_dim: int = 9216
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 131072
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int = 8192
    model_max_length: int = 131072
    tied_embeddings: bool = True
    use_biases: bool = False
    causal: bool = True
    ada_rms_norm_t_cond: bool = True
    ada_rms_norm_t_cond_dim: int = 32
    downsample_factor: int = 4
    encoder: EncoderArgs = field(default_factory=EncoderArgs)
    quantization: Optional[dict[str, Any]] = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Parse a ``params.json`` dict (Mistral native layout)."""
        whisper = params.get("multimodal", {}).get("whisper_model_args")
        if whisper is None:
            raise ValueError(
                "params.json has no multimodal.whisper_model_args section: "
                "this is not a Voxtral checkpoint"
            )
        if not params.get("ada_rms_norm_t_cond", False):
            raise ValueError(
                "params.json lacks ada_rms_norm_t_cond: this is an offline Voxtral "
                "checkpoint, not Voxtral Realtime"
            )
        args = super().from_dict(
            {k: v for k, v in params.items() if k not in ("encoder", "multimodal")}
        )
        args.encoder = EncoderArgs.from_dict(whisper["encoder_args"])
        args.downsample_factor = whisper.get("downsample_args", {}).get("downsample_factor", 4)
        return args

    @classmethod
    def from_mlx_audio(cls, config: dict[str, Any]) -> "ModelArgs":
        """Parse mlx-audio's ``config.json`` (``model_type: voxtral_realtime``): the decoder's
        parameters under ``decoder``, the encoder's under ``encoder_args`` (its
        ``audio_encoding_args`` nested there or at the top level, ``downsample_factor`` in it)
        and mlx-lm's ``quantization`` block (``quantization_config`` in older files). A
        section it lacks takes mlx-audio's defaults, the released model's, as mlx-audio does.

        The quantization block is kept as stored (the loader reads each layer off its
        shapes), with one ``mode`` for all its layers: the global one unless per-layer
        entries name another.

        Raises:
            ValueError: not voxtral_realtime, an offline (non-realtime) decoder, or layers
                quantized in more than one mode.
            TypeError: a section that is not a JSON object.
        """
        if config.get("model_type") != "voxtral_realtime":
            raise ValueError(f"model_type is {config.get('model_type')!r}, not 'voxtral_realtime'")
        decoder, encoder = config.get("decoder") or {}, dict(config.get("encoder_args") or {})
        if not isinstance(decoder, dict) or not isinstance(encoder, dict):
            raise TypeError("decoder and encoder_args must be JSON objects")
        if not decoder.get("ada_rms_norm_t_cond", True):
            raise ValueError("decoder.ada_rms_norm_t_cond is false: an offline Voxtral decoder, not Voxtral Realtime")
        args = super().from_dict({k: v for k, v in decoder.items() if k not in ("encoder", "quantization")})
        if "audio_encoding_args" not in encoder and "audio_encoding_args" in config:
            encoder["audio_encoding_args"] = config["audio_encoding_args"]
        args.encoder = EncoderArgs.from_dict(encoder)
        args.downsample_factor = encoder.get("downsample_factor", 4)
        block = config.get("quantization", config.get("quantization_config"))
        if block is not None:
            if not isinstance(block, dict):
                raise TypeError(f"quantization must be a JSON object, got {block!r}")
            mode = block.get("mode", "affine")
            modes = {mode} | {v.get("mode", mode) for v in block.values() if isinstance(v, dict)}
            if len(modes) > 1:
                raise ValueError(f"quantization mixes the modes {', '.join(sorted(modes))}; this package "
                                 "loads one mode per checkpoint")
            block = {**block, "mode": mode}
        args.quantization = block
        return args
