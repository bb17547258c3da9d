#!/usr/bin/env python
"""Write a random-weight Voxtral Realtime checkpoint in Mistral's exact native layout.

    python scripts/make_random_checkpoint.py --preset tiny --out checkpoints/tiny
    python scripts/make_random_checkpoint.py --preset full --out checkpoints/full

The folder holds ``params.json`` (the real schema), ``consolidated.safetensors`` (every
tensor name of the real file; the ``full`` preset has every real shape, bf16, 8.9 GB) and
``tekken.json`` (a real tekken vocabulary shipped with mistral-common, Voxtral's special
tokens and the streaming ``audio`` section). Weights are scaled so that the random model's
argmax is decisive and depends on the audio, which makes token-exact tests meaningful.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import mlx.core as mx

FULL_PARAMS = {
    "dim": 3072,
    "n_layers": 26,
    "head_dim": 128,
    "hidden_dim": 9216,
    "n_heads": 32,
    "n_kv_heads": 8,
    "use_biases": False,
    "causal": True,
    "rope_theta": 1000000.0,
    "norm_eps": 1e-05,
    "vocab_size": 131072,
    "model_parallel": 1,
    "tied_embeddings": True,
    "sliding_window": 8192,
    "model_max_length": 131072,
    "multimodal": {
        "whisper_model_args": {
            "encoder_args": {
                "audio_encoding_args": {
                    "sampling_rate": 16000,
                    "frame_rate": 12.5,
                    "num_mel_bins": 128,
                    "hop_length": 160,
                    "window_size": 400,
                    "chunk_length_s": None,
                    "global_log_mel_max": 1.5,
                    "transcription_format": "streaming",
                },
                "dim": 1280,
                "n_layers": 32,
                "head_dim": 64,
                "hidden_dim": 5120,
                "n_heads": 32,
                "vocab_size": 131072,
                "n_kv_heads": 32,
                "use_biases": True,
                "use_cache": False,
                "rope_theta": 1000000.0,
                "causal": True,
                "norm_eps": 1e-05,
                "pos_embed": "rope",
                "max_source_positions": None,
                "ffn_type": "swiglu",
                "norm_type": "rms_norm",
                "sliding_window": 750,
            },
            "downsample_args": {"downsample_factor": 4},
        }
    },
    "ada_rms_norm_t_cond": True,
    "ada_rms_norm_t_cond_dim": 32,
}

# Small dimensions, same names and structure. The encoder keeps the real 750-frame window
# so that audio longer than 15 s exercises it; n_heads * head_dim != dim and grouped-query
# attention as in the real model; every matrix dimension is a multiple of 64 so that
# quantization (group size 32/64) reaches every layer, as on the real model.
TINY = {
    "dim": 128, "n_layers": 2, "head_dim": 48, "hidden_dim": 256, "n_heads": 4, "n_kv_heads": 2,
    "encoder": {"dim": 128, "n_layers": 2, "head_dim": 48, "hidden_dim": 512, "n_heads": 4, "n_kv_heads": 4},
}

# The tiny widths at the real depth (26 decoder, 32 encoder layers): the full model's graph and
# code path per step at a fraction of its arithmetic (what host syncs and graph-building time
# are measured on).
DEEP = {**TINY, "n_layers": 26, "encoder": {**TINY["encoder"], "n_layers": 32}}

AUDIO_SECTION = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "transcription_delay_ms": 480,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": 32,
    "transcription_format": "streaming",
}

# Ids known from the released tekken.json (0, 1, 2, 11, 24, 25, 32, 33); the others follow
# mistral-common's SpecialTokens order; every unnamed id up to 999 is a filler.
SPECIAL_IDS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]",
    10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]",
    16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]",
    20: "[ARGS]", 21: "[CALL_ID]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[STREAMING_PAD]",
    33: "[STREAMING_WORD]", 34: "[TRANSCRIBE]",
}
NUM_SPECIAL = 1000


def make_params(
    preset: str,
    decoder_window: int | None = None,
    vocab_size: int | None = None,
    max_length: int | None = None,
    decoder_dim: int | None = None,
) -> dict:
    params = copy.deepcopy(FULL_PARAMS)
    if preset in ("tiny", "deep"):
        small = TINY if preset == "tiny" else DEEP
        enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
        params.update({k: v for k, v in small.items() if k != "encoder"})
        enc.update(small["encoder"])
    elif preset != "full":
        raise ValueError(f"unknown preset {preset!r}")
    if decoder_window is not None:
        params["sliding_window"] = decoder_window
    if vocab_size is not None:
        if vocab_size <= NUM_SPECIAL + 256:
            raise ValueError(f"vocab size must exceed {NUM_SPECIAL + 256} (specials + bytes)")
        params["vocab_size"] = vocab_size
        params["multimodal"]["whisper_model_args"]["encoder_args"]["vocab_size"] = vocab_size
    if max_length is not None:
        params["model_max_length"] = max_length
    if decoder_dim is not None:
        params["dim"] = decoder_dim
    return params


def tensor_shapes(params: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of consolidated.safetensors with its shape, in the file's naming."""
    enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
    factor = params["multimodal"]["whisper_model_args"]["downsample_args"]["downsample_factor"]
    n_mels = enc["audio_encoding_args"]["num_mel_bins"]
    E = "mm_streams_embeddings.embedding_module.whisper_encoder."
    A = "mm_streams_embeddings.embedding_module."
    d, ed = params["dim"], enc["dim"]
    shapes = {
        E + "conv_layers.0.conv.weight": (ed, n_mels, 3),
        E + "conv_layers.0.conv.bias": (ed,),
        E + "conv_layers.1.conv.weight": (ed, ed, 3),
        E + "conv_layers.1.conv.bias": (ed,),
    }
    q, kv = enc["n_heads"] * enc["head_dim"], enc["n_kv_heads"] * enc["head_dim"]
    for i in range(enc["n_layers"]):
        p = f"{E}transformer.layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (ed,),
            p + "attention.wq.weight": (q, ed),
            p + "attention.wq.bias": (q,),
            p + "attention.wk.weight": (kv, ed),
            p + "attention.wv.weight": (kv, ed),
            p + "attention.wv.bias": (kv,),
            p + "attention.wo.weight": (ed, q),
            p + "attention.wo.bias": (ed,),
            p + "ffn_norm.weight": (ed,),
            p + "feed_forward.w1.weight": (enc["hidden_dim"], ed),
            p + "feed_forward.w3.weight": (enc["hidden_dim"], ed),
            p + "feed_forward.w2.weight": (ed, enc["hidden_dim"]),
            p + "feed_forward.w2.bias": (ed,),
        })
    shapes[E + "transformer.norm.weight"] = (ed,)
    shapes[A + "audio_language_projection.0.weight"] = (d, ed * factor)
    shapes[A + "audio_language_projection.2.weight"] = (d, d)
    shapes[A + "tok_embeddings.weight"] = (params["vocab_size"], d)
    q, kv = params["n_heads"] * params["head_dim"], params["n_kv_heads"] * params["head_dim"]
    t = params["ada_rms_norm_t_cond_dim"]
    for j in range(params["n_layers"]):
        p = f"layers.{j}."
        shapes.update({
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (q, d),
            p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d),
            p + "attention.wo.weight": (d, q),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (params["hidden_dim"], d),
            p + "feed_forward.w3.weight": (params["hidden_dim"], d),
            p + "feed_forward.w2.weight": (d, params["hidden_dim"]),
            p + "ada_rms_norm_t_cond.0.weight": (t, d),
            p + "ada_rms_norm_t_cond.2.weight": (d, t),
        })
    shapes["norm.weight"] = (d,)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], key: mx.array, logit_scale: float = 1.0) -> mx.array:
    """A random tensor scaled so the random model's output is decisive and audio-driven.

    * Matrices have zero-mean rows: a random network otherwise turns the large
      time-invariant part of the log-mel (and every GELU's positive mean) into one
      embedding repeated at every position, and the output ignores the audio.
    * The conv stem has a gain of 3 so that speech dominates that invariant part.
    * Token embeddings are small (std 0.5 / sqrt(dim)) next to the adapter output: with a
      tied LM head a large input embedding makes the model copy its previous token.
      Logits then have a standard deviation of about 0.5 and a clear argmax.
      ``logit_scale`` multiplies the decoder's final norm (so the logits): a large one
      makes sampling at a low temperature pick the argmax, as a trained model's would.
    * EOS is damped (a random model would otherwise stop early at random);
      [STREAMING_PAD]/[STREAMING_WORD] are boosted so they appear, as in real output.
    """
    if name.endswith("norm.weight"):
        w = 1.0 + 0.1 * mx.random.normal(shape, key=key)
        return logit_scale * w if name == "norm.weight" else w
    if name.endswith(".bias"):
        return 0.02 * mx.random.normal(shape, key=key)
    if name.endswith("tok_embeddings.weight"):
        w = (0.5 / math.sqrt(shape[1])) * mx.random.normal(shape, key=key)
        row_scale = mx.ones((shape[0], 1))
        row_scale[2] = 0.5
        row_scale[32:34] = 1.8
        return w * row_scale
    w = mx.random.normal(shape, key=key) / math.sqrt(math.prod(shape[1:]))
    w = w - w.mean(axis=tuple(range(1, len(shape))), keepdims=True)
    return 3.0 * w if "conv_layers" in name else w


def make_tekken(vocab_size: int = 131072) -> dict:
    """tekken.json: mistral-common's bundled vocabulary, Voxtral specials, streaming audio."""
    import mistral_common

    data_dir = Path(mistral_common.__file__).parent / "data"
    tekken = json.loads((data_dir / "tekken_240911.json").read_text())
    tekken.pop("image", None)
    tekken["config"]["version"] = "v7"
    tekken["config"]["default_num_special_tokens"] = NUM_SPECIAL
    tekken["config"]["default_vocab_size"] = vocab_size
    tekken["special_tokens"] = [
        {"rank": i, "token_str": SPECIAL_IDS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL)
    ]
    tekken["audio"] = copy.deepcopy(AUDIO_SECTION)
    return tekken


def write_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "bfloat16",
    decoder_window: int | None = None,
    vocab_size: int | None = None,
    max_length: int | None = None,
    logit_scale: float = 1.0,
    decoder_dim: int | None = None,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = make_params(preset, decoder_window, vocab_size, max_length, decoder_dim)
    dt = getattr(mx, dtype)
    tensors = {}
    for i, (name, shape) in enumerate(tensor_shapes(params).items()):
        key = mx.random.key(seed * 1_000_003 + i)
        tensors[name] = random_tensor(name, shape, key, logit_scale).astype(dt)
        mx.eval(tensors[name])
    mx.save_safetensors(str(out / "consolidated.safetensors"), tensors, metadata={"format": "pt"})
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (out / "tekken.json").write_text(json.dumps(make_tekken(params["vocab_size"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["tiny", "deep", "full"], default="tiny",
                        help="tiny widths and depth; tiny widths at the real depth; every real shape")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                        help="stored dtype (the real checkpoint is bfloat16)")
    parser.add_argument("--decoder-window", type=int, default=None,
                        help="override the decoder sliding window (tests use a small one)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the vocabulary size (a small one makes decoding fast)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="override model_max_length (tests of the position limit)")
    parser.add_argument("--decoder-dim", type=int, default=None,
                        help="override the decoder width (mlx-audio 0.6.2 needs the real 3072)")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="scale the logits (a large one makes low-temperature sampling greedy)")
    args = parser.parse_args()
    path = write_checkpoint(args.out, args.preset, args.seed, args.dtype, args.decoder_window,
                            args.vocab_size, args.max_length, args.logit_scale, args.decoder_dim)
    print(f"wrote {args.preset} random checkpoint to {path}")


if __name__ == "__main__":
    main()
