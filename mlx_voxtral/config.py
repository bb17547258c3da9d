"""Model arguments parsed from Mistral's native ``params.json`` (or the ``config.json`` of
transformers or mlx-audio)."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
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

    def to_params(self) -> dict[str, Any]:
        """These arguments as Mistral's ``params.json`` (``from_dict`` reads them back equal),
        without a quantization block."""
        top = {k: v for k, v in asdict(self).items() if k not in ("encoder", "downsample_factor", "quantization")}
        whisper = {"encoder_args": asdict(self.encoder), "downsample_args": {"downsample_factor": self.downsample_factor}}
        return {**top, "multimodal": {"whisper_model_args": whisper}}

    @classmethod
    def from_transformers(
        cls, config: dict[str, Any], feature_extractor: Optional[dict[str, Any]] = None
    ) -> "ModelArgs":
        """Parse the ``config.json`` that transformers' ``VoxtralRealtimeForConditionalGeneration``
        writes (``audio_config``, ``text_config``), with the audio front end's settings from its
        processor's ``feature_extractor`` block where given (else the model's defaults).

        What transformers' modules fix rather than configure is fixed here too: biases on the
        encoder's q/v/o and FFN output and none in the decoder, the 32-wide delay (ada) norm
        and SwiGLU. The default delay is the tokenizer's (``tekken.json``), as in transformers'
        processor; ``default_num_delay_tokens`` is transformers' fallback only.

        Raises:
            ValueError: not a Voxtral Realtime config, quantized by transformers, or a setting
                this model does not have (another activation or RoPE type, an audio token that
                is not two conv strides times ``downsample_factor`` mel frames).
        """
        kind = config.get("model_type")
        if kind != "voxtral_realtime" or not isinstance(config.get("audio_config"), dict) \
                or not isinstance(config.get("text_config"), dict):
            lacks = "".join(f", no {k}" for k in ("audio_config", "text_config") if not isinstance(config.get(k), dict))
            raise ValueError(f"model_type {kind!r}{lacks}: not transformers' Voxtral Realtime config "
                             "(model_type 'voxtral_realtime' with audio_config and text_config)")
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "unnamed")
            raise ValueError(f"quantized by transformers ({method}), which this package does not read: load the "
                             "unquantized folder (quantize= quantizes it here)")
        audio, text = config["audio_config"], config["text_config"]
        features = feature_extractor or {}
        downsample = config.get("downsample_factor", 4)
        if config.get("audio_length_per_tok", 2 * downsample) != 2 * downsample:
            raise ValueError(f"audio_length_per_tok {config['audio_length_per_tok']} is not 2 x downsample_factor "
                             f"({downsample}): this model's audio token is two conv strides times the downsampling")
        for key, value, expected in (
            ("text_config.hidden_act", text.get("hidden_act", "silu"), "silu"),
            ("audio_config.hidden_act", audio.get("hidden_act", "silu"), "silu"),
            ("projector_hidden_act", config.get("projector_hidden_act", "gelu"), "gelu"),
            ("audio_config.rope type", _rope(audio, key="rope_type", default="default"), "default"),
            ("text_config.rope type", _rope(text, key="rope_type", default="default"), "default"),
        ):
            if value != expected:
                raise ValueError(f"{key} is {value!r}; this model has only {expected!r}")
        try:
            return cls._from_transformers(config, audio, text, features, downsample)
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r} in audio_config or text_config") from None

    @classmethod
    def _from_transformers(
        cls, config: dict[str, Any], audio: dict[str, Any], text: dict[str, Any], features: dict[str, Any],
        downsample: int,
    ) -> "ModelArgs":
        """``from_transformers``' arguments from its checked sections (KeyError: one lacks a size)."""
        sampling_rate = features.get("sampling_rate", 16000)
        hop_length = features.get("hop_length", 160)
        encoder = EncoderArgs(
            dim=audio["hidden_size"],
            n_layers=audio["num_hidden_layers"],
            head_dim=audio.get("head_dim") or audio["hidden_size"] // audio["num_attention_heads"],
            hidden_dim=audio["intermediate_size"],
            n_heads=audio["num_attention_heads"],
            n_kv_heads=audio["num_attention_heads"],  # transformers' encoder has no GQA
            use_biases=True,
            rope_theta=_rope(audio),
            norm_eps=audio.get("rms_norm_eps", 1e-5),
            sliding_window=audio.get("sliding_window", 750),
            audio_encoding_args=AudioEncodingArgs(
                sampling_rate=sampling_rate,
                frame_rate=sampling_rate / hop_length / (2 * downsample),
                num_mel_bins=audio.get("num_mel_bins", 128),
                hop_length=hop_length,
                window_size=features.get("n_fft", 400),
                global_log_mel_max=features.get("global_log_mel_max", 1.5),
            ),
        )
        n_mels = encoder.audio_encoding_args.num_mel_bins
        if features.get("feature_size", n_mels) != n_mels:
            raise ValueError(f"the feature extractor's feature_size {features['feature_size']} is not audio_config's "
                             f"num_mel_bins {n_mels}")
        n_heads = text["num_attention_heads"]
        window = text.get("sliding_window", 8192)  # None: full attention (transformers' default is 8192)
        return cls(
            dim=text["hidden_size"],
            n_layers=text["num_hidden_layers"],
            head_dim=text.get("head_dim") or text["hidden_size"] // n_heads,
            hidden_dim=text["intermediate_size"],
            n_heads=n_heads,
            n_kv_heads=text.get("num_key_value_heads") or n_heads,
            vocab_size=text["vocab_size"],
            rope_theta=_rope(text),
            norm_eps=text.get("rms_norm_eps", 1e-5),
            sliding_window=window if window is not None else text.get("max_position_embeddings", 131072),
            model_max_length=text.get("max_position_embeddings", 131072),
            tied_embeddings=config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)),
            use_biases=False,
            ada_rms_norm_t_cond=True,
            ada_rms_norm_t_cond_dim=32,  # transformers' VoxtralRealtimeTextAdaRmsNorm: nn.Linear(dim, 32)
            downsample_factor=downsample,
            encoder=encoder,
        )


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


def _rope(section: dict[str, Any], key: str = "rope_theta", default: Any = 1e6) -> Any:
    """A RoPE setting of a transformers sub-config: in ``rope_parameters`` (transformers 5),
    or at the top level (older configs)."""
    params = section.get("rope_parameters") or {}
    return params.get(key, section.get(key, default))
