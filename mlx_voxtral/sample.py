"""How a session picks its tokens: greedy argmax, or mlx-lm's sampling chain.

Greedy decoding (temperature 0) is what Voxtral Realtime is made for. With a temperature the
logits go through mlx-lm's ``sample_utils`` (``top_p``, ``min_p``, ``top_k``, then a draw);
a session with a ``seed`` draws from its own random key, so its tokens do not depend on the
other sessions it is decoded with.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .validate import check_probability, check_seed, check_temperature, check_top_k


class Sampler:
    """Token choice for one session; validated when built."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
    ):
        self.temperature = check_temperature(temperature)
        self.top_p = check_probability(top_p, "top_p", 1.0)
        self.min_p = check_probability(min_p, "min_p", 0.0)
        self.top_k = check_top_k(top_k)
        seed = check_seed(seed)
        self.greedy = self.temperature == 0
        self._key = None if self.greedy or seed is None else mx.random.key(seed % 2**64)
        self._filters = None

    def _draw(self, logprobs: mx.array) -> mx.array:
        # imported on first use: mlx_lm imports transformers (seconds), greedy needs none of it
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

        if self._key is None:  # mlx-lm's own chain, drawing from MLX's global random state
            if self._filters is None:
                self._filters = make_sampler(self.temperature, self.top_p, self.min_p, top_k=self.top_k)
            return self._filters(logprobs)
        # a seeded session: mlx-lm's filters, then a draw from the session's own key
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        self._key, key = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=key)

    def __call__(self, logits: mx.array) -> mx.array:
        """``logits`` ``[n, vocab]`` -> tokens ``[n]``."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        logprobs = logits.astype(mx.float32)
        return self._draw(logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True))


def sample(logits: mx.array, samplers: Sequence[Sampler]) -> mx.array:
    """Tokens ``[n]`` for a batch's logits ``[n, vocab]``, row i picked by ``samplers[i]``: one
    argmax for every greedy row, then one draw per sampling row."""
    tokens = mx.argmax(logits, axis=-1)
    for i, s in enumerate(samplers):
        if not s.greedy:
            tokens[i : i + 1] = s(logits[i : i + 1]).astype(tokens.dtype)
    return tokens
