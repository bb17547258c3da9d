"""Voxtral Realtime: audio encoder -> temporal adapter -> delay-conditioned Mistral decoder."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .adapter import AudioAdapter
from .cache import ConvCache, KVCache
from .config import ModelArgs
from .decoder import Decoder
from .encoder import AudioEncoder

_ENCODER = "mm_streams_embeddings.embedding_module.whisper_encoder."
_EMBEDDING = "mm_streams_embeddings.embedding_module."


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.encoder = AudioEncoder(args.encoder)
        self.adapter = AudioAdapter(args.encoder.dim, args.dim, args.downsample_factor)
        self.decoder = Decoder(args)
        self._ada_scales: dict[int, list[mx.array]] = {}

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.norm.weight.dtype

    def ada_scales(self, num_delay_tokens: int) -> list[mx.array]:
        """Per-layer delay conditioning, computed once per delay and kept."""
        if num_delay_tokens not in self._ada_scales:
            scales = self.decoder.ada_scales(num_delay_tokens)
            mx.eval(scales)
            self._ada_scales[num_delay_tokens] = scales
        return self._ada_scales[num_delay_tokens]

    def embed_audio(
        self,
        mels: Sequence[mx.array],
        conv_caches: Sequence[Sequence[ConvCache]],
        encoder_caches: Sequence[Sequence[KVCache]],
    ) -> list[mx.array]:
        """Encode several streams' next mel frames in one pass.

        ``mels[i]`` is stream i's ``[T_i, n_mels]`` block with ``T_i`` a multiple of 8 (whole
        80 ms tokens). Returns each stream's audio embeddings ``[T_i / 8, dim]``.
        """
        frames = [
            self.encoder.conv_stem(m[None].astype(self.dtype), c)
            for m, c in zip(mels, conv_caches)
        ]
        lengths = [f.shape[1] for f in frames]
        x = frames[0] if len(frames) == 1 else mx.concatenate(frames, axis=1)
        x = self.adapter(self.encoder(x, encoder_caches, lengths))[0]
        out, start = [], 0
        for n in lengths:
            n //= self.args.downsample_factor
            out.append(x[start : start + n])
            start += n
        return out

    def __call__(
        self,
        audio_embeds: Sequence[mx.array],
        tokens: Sequence[mx.array],
        caches: Sequence[Sequence[KVCache]],
        num_delay_tokens: Sequence[int],
    ) -> mx.array:
        """One decoder pass over several streams' next positions.

        Stream i contributes ``audio_embeds[i]`` [n_i, dim] and the text tokens ``tokens[i]``
        [n_i] fed at those positions (their sum is the decoder input). Returns logits of the
        last position of every stream, ``[n_streams, vocab]``.
        """
        x = [a + self.decoder.tok_embeddings(t) for a, t in zip(audio_embeds, tokens)]
        lengths = [e.shape[0] for e in x]
        x = (x[0] if len(x) == 1 else mx.concatenate(x))[None]
        if len(set(num_delay_tokens)) == 1:
            scales = self.ada_scales(num_delay_tokens[0])
        else:
            per_stream = [self.ada_scales(d) for d in num_delay_tokens]
            scales = [
                mx.concatenate(
                    [mx.broadcast_to(s[l], (n, s[l].shape[-1])) for s, n in zip(per_stream, lengths)]
                )[None]
                for l in range(len(self.decoder.layers))
            ]
        last = [sum(lengths[: i + 1]) - 1 for i in range(len(lengths))]
        return self.decoder(x, scales, caches, lengths, last)[0]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Mistral native tensor names and layouts onto this module tree."""
        out = {}
        for name, w in weights.items():
            if name.startswith(_ENCODER):
                name = name[len(_ENCODER) :]
                if name.startswith("conv_layers."):
                    name = name.replace(".conv.", ".")
                    if name.endswith(".weight") and w.ndim == 3:
                        w = w.swapaxes(1, 2)  # [out, in, k] -> [out, k, in]
                name = "encoder." + name.replace("transformer.", "")
            elif name.startswith(_EMBEDDING + "audio_language_projection."):
                index = name.split(".")[3]
                name = "adapter." + {"0": "w_in", "2": "w_out"}.get(index, index) + "." + name.split(".", 4)[4]
            elif name.startswith(_EMBEDDING + "tok_embeddings."):
                name = "decoder." + name[len(_EMBEDDING) :]
            elif name.startswith("layers.") or name.startswith("norm.") or name.startswith("output."):
                name = "decoder." + name.replace("ada_rms_norm_t_cond.0.", "ada_down.").replace(
                    "ada_rms_norm_t_cond.2.", "ada_up."
                )
            out[name] = w
        return out
