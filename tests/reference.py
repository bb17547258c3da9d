"""Independent reference: Hugging Face transformers' voxtral_realtime (torch, float32, CPU).

Builds a ``VoxtralRealtimeForConditionalGeneration`` and ``VoxtralRealtimeProcessor`` from a
checkpoint in Mistral's native layout, mapping the weights the way transformers' own
conversion script does (HF runs half-split RoPE, so q/k rows are permuted per head).
Nothing here imports mlx_voxtral.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

E = "mm_streams_embeddings.embedding_module.whisper_encoder."
A = "mm_streams_embeddings.embedding_module."


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-RoPE rows -> half-split rows, per head (weights or biases)."""
    rows = w.shape[0]
    tail = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail)


def hf_config(params: dict):
    from transformers import VoxtralRealtimeConfig

    enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
    rope = lambda theta: {"rope_type": "default", "rope_theta": theta}  # noqa: E731
    return VoxtralRealtimeConfig(
        audio_config=dict(
            hidden_size=enc["dim"],
            intermediate_size=enc["hidden_dim"],
            num_hidden_layers=enc["n_layers"],
            num_attention_heads=enc["n_heads"],
            head_dim=enc["head_dim"],
            num_mel_bins=enc["audio_encoding_args"]["num_mel_bins"],
            sliding_window=enc["sliding_window"],
            rms_norm_eps=enc["norm_eps"],
            rope_parameters=rope(enc["rope_theta"]),
        ),
        text_config=dict(
            hidden_size=params["dim"],
            intermediate_size=params["hidden_dim"],
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params["n_kv_heads"],
            head_dim=params["head_dim"],
            vocab_size=params["vocab_size"],
            sliding_window=params["sliding_window"],
            rms_norm_eps=params["norm_eps"],
            max_position_embeddings=params["model_max_length"],
            rope_parameters=rope(params["rope_theta"]),
        ),
        downsample_factor=params["multimodal"]["whisper_model_args"]["downsample_args"]["downsample_factor"],
    )


def hf_state_dict(native: dict[str, np.ndarray], params: dict) -> dict[str, torch.Tensor]:
    enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
    out = {}
    for name, w in native.items():
        t = torch.from_numpy(np.asarray(w, dtype=np.float32))
        if name.startswith(E + "conv_layers."):
            i = name.split(".")[4]
            new = f"model.audio_tower.embedder.conv{int(i) + 1}.{name.rsplit('.', 1)[1]}"
        elif name == E + "transformer.norm.weight":
            new = "model.audio_tower.norm.weight"
        elif name.startswith(E + "transformer.layers."):
            rest = name[len(E + "transformer.layers.") :]
            i, sub = rest.split(".", 1)
            sub = (
                sub.replace("attention.wq", "self_attn.q_proj")
                .replace("attention.wk", "self_attn.k_proj")
                .replace("attention.wv", "self_attn.v_proj")
                .replace("attention.wo", "self_attn.o_proj")
                .replace("attention_norm", "self_attn_layer_norm")
                .replace("ffn_norm", "final_layer_norm")
                .replace("feed_forward.w1", "mlp.gate_proj")
                .replace("feed_forward.w3", "mlp.up_proj")
                .replace("feed_forward.w2", "mlp.down_proj")
            )
            if "q_proj" in sub or "k_proj" in sub:
                t = _permute(t, enc["n_heads"])
            new = f"model.audio_tower.layers.{i}.{sub}"
        elif name.startswith(A + "audio_language_projection."):
            idx = name.split(".")[3]
            new = f"model.multi_modal_projector.linear_{1 if idx == '0' else 2}.weight"
        elif name == A + "tok_embeddings.weight":
            new = "model.language_model.embed_tokens.weight"
            out["lm_head.weight"] = t
        elif name == "norm.weight":
            new = "model.language_model.norm.weight"
        elif name.startswith("layers."):
            _, i, sub = name.split(".", 2)
            sub = (
                sub.replace("attention.wq", "self_attn.q_proj")
                .replace("attention.wk", "self_attn.k_proj")
                .replace("attention.wv", "self_attn.v_proj")
                .replace("attention.wo", "self_attn.o_proj")
                .replace("attention_norm", "input_layernorm")
                .replace("ffn_norm", "post_attention_layernorm")
                .replace("feed_forward.w1", "mlp.gate_proj")
                .replace("feed_forward.w3", "mlp.up_proj")
                .replace("feed_forward.w2", "mlp.down_proj")
                .replace("ada_rms_norm_t_cond.0", "ada_rms_norm.linear1")
                .replace("ada_rms_norm_t_cond.2", "ada_rms_norm.linear2")
            )
            if "q_proj" in sub:
                t = _permute(t, params["n_heads"])
            elif "k_proj" in sub:
                t = _permute(t, params["n_kv_heads"])
            new = f"model.language_model.layers.{i}.{sub}"
        else:
            raise KeyError(f"unexpected checkpoint tensor {name}")
        out[new] = t
    return out


def _load_native(path: Path) -> dict[str, np.ndarray]:
    # numpy has no bfloat16: read through torch's safetensors loader.
    from safetensors.torch import load_file as load_torch

    return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


class Reference:
    """transformers' model + processor for one native checkpoint, in float32."""

    def __init__(self, checkpoint: str | Path):
        from transformers import (
            VoxtralRealtimeFeatureExtractor,
            VoxtralRealtimeForConditionalGeneration,
            VoxtralRealtimeProcessor,
        )
        from transformers.tokenization_mistral_common import MistralCommonBackend

        checkpoint = Path(checkpoint)
        self.params = json.loads((checkpoint / "params.json").read_text())
        self.config = hf_config(self.params)
        torch.manual_seed(0)
        self.model = VoxtralRealtimeForConditionalGeneration(self.config).float().eval()
        state = hf_state_dict(_load_native(checkpoint / "consolidated.safetensors"), self.params)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert not [m for m in missing if "inv_freq" not in m], missing
        audio_args = self.params["multimodal"]["whisper_model_args"]["encoder_args"]["audio_encoding_args"]
        self.feature_extractor = VoxtralRealtimeFeatureExtractor(
            feature_size=audio_args["num_mel_bins"],
            sampling_rate=audio_args["sampling_rate"],
            hop_length=audio_args["hop_length"],
            n_fft=audio_args["window_size"],
            win_length=audio_args["window_size"],
            global_log_mel_max=audio_args["global_log_mel_max"],
        )
        self.tokenizer = MistralCommonBackend(str(checkpoint / "tekken.json"))
        self.processor = VoxtralRealtimeProcessor(self.feature_extractor, self.tokenizer)

    def inputs(self, audio: np.ndarray, delay_ms: int | None = None) -> dict:
        """Model inputs for 16 kHz float audio, the way ``VoxtralRealtimeProcessor`` builds
        them: mistral-common's ``encode_transcription`` (offline streaming mode) gives the
        prompt and the padded audio, transformers' feature extractor the log-mel.

        The processor hands mistral-common a 16-bit WAV, which quantizes the samples; here
        the WAV is 32-bit float so both implementations see exactly the same audio.
        """
        import base64
        import io

        import soundfile as sf
        from mistral_common.protocol.transcription.request import StreamingMode, TranscriptionRequest

        buf = io.BytesIO()
        sf.write(buf, np.asarray(audio, np.float32), 16000, format="WAV", subtype="FLOAT")
        request = TranscriptionRequest(
            audio=base64.b64encode(buf.getvalue()).decode(),
            streaming=StreamingMode.OFFLINE,
            target_streaming_delay_ms=delay_ms,
        )
        mistral = self.tokenizer.tokenizer
        encoded = mistral.encode_transcription(request)
        padded = encoded.audios[0].audio_array
        features = self.feature_extractor(padded, sampling_rate=16000, return_tensors="pt")
        audio_config = mistral.instruct_tokenizer.audio_encoder.audio_config
        return {
            "input_ids": torch.tensor([encoded.tokens]),
            "input_features": features["input_features"],
            "num_delay_tokens": torch.tensor(audio_config.get_num_delay_tokens(delay_ms)),
            "padded_audio": padded,
        }

    def generate(self, audio: np.ndarray, delay_ms: int | None = None) -> list[int]:
        return self.generate_with_margins(audio, delay_ms)[0]

    @torch.no_grad()
    def generate_with_margins(self, audio: np.ndarray, delay_ms: int | None = None) -> tuple[list[int], list[float]]:
        """Greedy ids and, for each, the margin between the top two logits of its step."""
        inputs = self.inputs(audio, delay_ms)
        out = self.model.generate(
            input_ids=inputs["input_ids"],
            input_features=inputs["input_features"],
            num_delay_tokens=inputs["num_delay_tokens"],
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        margins = []
        for logits in out.logits:
            top = torch.topk(logits[0].float(), 2).values
            margins.append(float(top[0] - top[1]))
        return ids, margins
