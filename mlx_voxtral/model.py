"""Voxtral Realtime: audio encoder -> temporal adapter -> delay-conditioned Mistral decoder."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .adapter import AudioAdapter
from .cache import Cache
from .config import ModelArgs
from .decoder import Decoder
from .encoder import AudioEncoder

_ENCODER = "mm_streams_embeddings.embedding_module.whisper_encoder."
_EMBEDDING = "mm_streams_embeddings.embedding_module."

# Other projects' MLX layouts of the same tensors: (our name part, theirs) pairs, replaced in
# order (reversed order to write theirs). Their conv stems are MLX's [out, k, in] already.
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # voxmlx 0.0.2 (voxmlx/weights.py): config.json is the native params.json
    "voxmlx": (
        ("encoder.conv_layers.0.", "encoder.conv1."),
        ("encoder.conv_layers.1.", "encoder.conv2."),
        ("decoder.tok_embeddings.", "language_model.embed_tokens."),
        ("decoder.layers.", "language_model.layers."),
        ("decoder.norm.", "language_model.norm."),
        (".attention.wq.", ".attention.q_proj."),
        (".attention.wk.", ".attention.k_proj."),
        (".attention.wv.", ".attention.v_proj."),
        (".attention.wo.", ".attention.o_proj."),
        (".attention_norm.", ".attn_norm."),
        (".feed_forward.w1.", ".mlp.gate_proj."),
        (".feed_forward.w2.", ".mlp.down_proj."),
        (".feed_forward.w3.", ".mlp.up_proj."),
        (".ada_down.", ".ada_norm.linear_in."),
        (".ada_up.", ".ada_norm.linear_out."),
    ),
    # mlx-audio 0.6.2 (mlx_audio/stt/models/voxtral_realtime): the adapter lives in its encoder
    "mlx-audio": (
        ("encoder.conv_layers.0.", "encoder.conv_layers_0_conv.conv."),
        ("encoder.conv_layers.1.", "encoder.conv_layers_1_conv.conv."),
        ("encoder.layers.", "encoder.transformer_layers."),
        ("encoder.norm.", "encoder.transformer_norm."),
        ("adapter.w_in.", "encoder.audio_language_projection_0."),
        ("adapter.w_out.", "encoder.audio_language_projection_2."),
        (".feed_forward.w1.", ".feed_forward_w1."),
        (".feed_forward.w2.", ".feed_forward_w2."),
        (".feed_forward.w3.", ".feed_forward_w3."),
        (".ada_down.", ".ada_rms_norm_t_cond.ada_down."),
        (".ada_up.", ".ada_rms_norm_t_cond.ada_up."),
    ),
}

# transformers' VoxtralRealtimeForConditionalGeneration (save_pretrained), pairs as in LAYOUTS.
# Its files name the three parts as transformers 5 saves them (audio_tower., language_model.model.,
# multi_modal_projector.) or as its modules do (model.audio_tower., ...): both are listed. What a
# table cannot say, ``sanitize`` does: torch conv kernels are [out, in, k], and the q/k rows of each
# head are in half-split RoPE order (transformers' conversion permutes them; see ``_interleave``).
TRANSFORMERS: tuple[tuple[str, str], ...] = (
    ("decoder.output.", "language_model.lm_head."),
    ("decoder.output.", "lm_head."),
    ("encoder.", "model.audio_tower."),
    ("encoder.", "audio_tower."),
    ("decoder.", "model.language_model."),
    ("decoder.", "language_model.model."),
    ("adapter.", "model.multi_modal_projector."),
    ("adapter.", "multi_modal_projector."),
    ("adapter.w_in.", "adapter.linear_1."),
    ("adapter.w_out.", "adapter.linear_2."),
    ("encoder.conv_layers.0.", "encoder.embedder.conv1."),
    ("encoder.conv_layers.1.", "encoder.embedder.conv2."),
    ("decoder.tok_embeddings.", "decoder.embed_tokens."),
    (".attention.wq.", ".self_attn.q_proj."),
    (".attention.wk.", ".self_attn.k_proj."),
    (".attention.wv.", ".self_attn.v_proj."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".attention_norm.", ".self_attn_layer_norm."),  # encoder
    (".ffn_norm.", ".final_layer_norm."),
    (".attention_norm.", ".input_layernorm."),  # decoder
    (".ffn_norm.", ".post_attention_layernorm."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".ada_down.", ".ada_rms_norm.linear1."),
    (".ada_up.", ".ada_rms_norm.linear2."),
)


class Model(nn.Module):
    """Voxtral Realtime over a batch of streams.

    ``encode`` turns each row's next mel frames into audio embeddings (one per 80 ms token);
    ``__call__`` runs the decoder over each row's next positions (audio embedding plus the
    text token fed there) and returns the logits of the last one. Both work on a contiguous
    range of the rows of a ``Cache`` (``make_cache``), each row with its own number of real
    positions (the rest is padding).
    """

    # whole 80 ms tokens of audio per row in one encoder pass (the encoder ring's chunk)
    encode_tokens = 64

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.encoder = AudioEncoder(args.encoder)
        self.adapter = AudioAdapter(args.encoder.dim, args.dim, args.downsample_factor)
        self.decoder = Decoder(args)
        self._ada: dict = {}

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.norm.weight.dtype

    @property
    def mel_frames_per_token(self) -> int:
        return 2 * self.args.downsample_factor  # conv stem stride 2, then the adapter's grouping

    def make_cache(self, max_prompt: int) -> Cache:
        """State for a batch of streams whose decoder prompts have at most ``max_prompt`` positions."""
        return Cache(
            self.encoder.make_cache(self.encode_tokens * self.mel_frames_per_token),
            self.decoder.make_cache(max_prompt),
        )

    def ada_scales(self, delays: Sequence[int]) -> list[mx.array]:
        """Per-layer FFN-norm scales for rows of the given delays (in tokens): ``[dim]`` each when
        the rows share one delay, else ``[rows, 1, dim]``. Computed once per delay (and per mix
        of delays, which rarely changes) and kept."""
        key = delays[0] if len(set(delays)) == 1 else tuple(delays)
        if key not in self._ada:
            if isinstance(key, int):
                scales = self.decoder.ada_scales(key)
            else:
                per_delay = [mx.stack(self.ada_scales([d])) for d in delays]  # [layers, dim] each
                table = mx.stack(per_delay, axis=1)[:, :, None]  # [layers, rows, 1, dim]
                scales = [table[i] for i in range(table.shape[0])]
                if len(self._ada) > 64:  # mixes come and go with a server's sessions
                    self._ada = {k: v for k, v in self._ada.items() if isinstance(k, int)}
            self._ada[key] = scales
        return self._ada[key]

    def encode(self, mel: mx.array, cache: Cache, rows: slice, lengths: Sequence[int]) -> mx.array:
        """Rows ``rows`` of ``cache`` take their next mel frames ``mel`` ``[n, T, n_mels]``: row i's
        first ``lengths[i]`` frames are real (whole tokens). Returns ``[n, T / 8, dim]``, of which
        row i's first ``lengths[i] / 8`` embeddings are real."""
        cache.encoder.prepare(rows, lengths, mel.shape[1])
        x = self.adapter(self.encoder(mel.astype(self.dtype), cache.encoder))
        cache.encoder.finalize()
        return x

    def __call__(
        self,
        audio_embeds: mx.array,
        tokens: mx.array,
        cache: Cache,
        rows: slice,
        lengths: Sequence[int],
        delays: Sequence[int],
    ) -> mx.array:
        """One decoder pass over rows ``rows`` of ``cache``: row i feeds ``lengths[i]`` positions
        (0: the row sits this pass out), each the sum of its audio embedding
        (``audio_embeds`` ``[n, L, dim]``) and the text token there (``tokens`` ``[n, L]``), with
        the delay conditioning of ``delays[i]`` tokens. Returns the logits of each row's last
        position, ``[n, vocab]``."""
        cache.decoder.prepare(rows, lengths, tokens.shape[1])
        h = audio_embeds.astype(self.dtype) + self.decoder.tok_embeddings(tokens)
        logits = self.decoder(h, self.ada_scales(delays), cache.decoder)
        cache.decoder.finalize()
        return logits

    @staticmethod
    def sanitize(
        weights: dict[str, mx.array], layout: str = "native", args: Optional[ModelArgs] = None
    ) -> dict[str, mx.array]:
        """Map a checkpoint's tensor names and layouts onto this module tree: Mistral's native
        names (and this package's own, which pass through), one of ``LAYOUTS``', or
        transformers' (``TRANSFORMERS``; ``args`` gives the head counts its q/k rows are
        permuted by, and a tied LM head it stores is dropped). Names it does not know pass
        through (renamed where a pair matched), for the loader to report."""
        if layout == "transformers":
            if args is None:
                raise ValueError("sanitize needs the model's args for the transformers layout")
            return _from_transformers(weights, args)
        if layout in LAYOUTS:
            return {_rename(name, LAYOUTS[layout]): w for name, w in weights.items()}
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

    @staticmethod
    def to_layout(weights: dict[str, mx.array], layout: str) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for one of ``LAYOUTS``: this module tree's tensors under
        that project's names."""
        return {_rename(name, LAYOUTS[layout], reverse=True): w for name, w in weights.items()}


def _rename(name: str, pairs: tuple[tuple[str, str], ...], reverse: bool = False) -> str:
    """``name`` with each pair's second part replaced by its first (``reverse``: the first by
    the second, the pairs in reverse order)."""
    for ours, theirs in reversed(pairs) if reverse else pairs:
        name = name.replace(ours, theirs) if reverse else name.replace(theirs, ours)
    return name


def _from_transformers(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """transformers' tensors under this module tree's names and layouts (``Model.sanitize``)."""
    heads = {  # (part, projection): heads its rows are permuted by
        ("encoder", "wq"): args.encoder.n_heads,
        ("encoder", "wk"): args.encoder.n_kv_heads,
        ("decoder", "wq"): args.n_heads,
        ("decoder", "wk"): args.n_kv_heads,
    }
    out = {}
    for name, w in weights.items():
        name = _rename(name, TRANSFORMERS)
        parts = name.split(".")
        if name.startswith("encoder.conv_layers.") and parts[-1] == "weight" and w.ndim == 3:
            w = w.swapaxes(1, 2)  # torch [out, in, k] -> [out, k, in]
        elif len(parts) == 6 and parts[1] == "layers" and parts[3] == "attention" and (parts[0], parts[4]) in heads:
            w = _interleave(w, heads[parts[0], parts[4]])
        elif name == "decoder.output.weight" and args.tied_embeddings:
            continue  # the tied head is the embedding
        out[name] = w
    return out


def _interleave(w: mx.array, n_heads: int) -> mx.array:
    """q/k rows (weights or biases) from transformers' half-split RoPE order back to Mistral's
    interleaved one, per head: row ``h, j, i`` (head, half, pair) is row ``h, i, j``. A row
    count the heads do not split in pairs passes through, for the loader's shape check."""
    rows, tail = w.shape[0], w.shape[1:]
    if rows % (2 * n_heads):
        return w
    return w.reshape(n_heads, 2, rows // n_heads // 2, *tail).swapaxes(1, 2).reshape(rows, *tail)
