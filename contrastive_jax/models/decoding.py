"""Greedy and beam-search decoding under ``jit`` for the captioning decoder (or any next-token model).

The model is seen through one function, ``logits_fn(tokens, position) -> [N, V]``: given the
``[N, max_len]`` int32 buffer of the tokens decoded so far (zeros = pad after ``position``) it
returns the next-token logits at ``position`` (the distribution of ``tokens[:, position]``
given ``tokens[:, :position]``). That is exactly :class:`~contrastive_jax.models.decoder.TextDecoder`'s
teacher-forcing convention, so :func:`decoder_logits_fn` re-runs the decoder on the buffer
(re-run-the-prefix decoding, no KV cache: O(max_len) full decoder passes, fine for captions).
For beam search ``N = B * K`` and row ``r`` belongs to example ``r // K``.

Both loops are ``lax.while_loop`` over positions with a fixed ``max_len`` (static shapes), and
stop early once every sequence has emitted ``eos_id``; a finished sequence is padded with
``pad_id`` and its score no longer changes. Scores are sums of log-probabilities (nats).

Beam search keeps the ``K`` best hypotheses by their length-normalized score
``logp / lp(len)`` with GNMT's penalty ``lp(len) = ((5 + len) / 6) ** alpha`` (Wu et al. 2016,
"Google's Neural Machine Translation System", eq. 14); ``alpha = 0`` ranks by ``logp`` alone.
``len`` counts the tokens up to and including EOS. A finished hypothesis stays in the beam as one
candidate (extended by pad at no cost), competing with the live ones at every step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
_NEG_INF = -jnp.inf


class Decoded(NamedTuple):
    """tokens: ``[B, max_len]`` int32 (pad after EOS); scores: ``[B]`` float32 (sum of
    log-probabilities; for beam search the length-normalized score). beams / beam_scores
    (beam search only, else None): all ``[B, K, max_len]`` hypotheses and ``[B, K]`` normalized
    scores, best first."""

    tokens: jax.Array
    scores: jax.Array
    beams: jax.Array | None = None
    beam_scores: jax.Array | None = None


def greedy_decode(logits_fn: LogitsFn, batch_size: int, max_len: int, *, eos_id: int, pad_id: int = 0) -> Decoded:
    """Takes the most probable token at every position (first index on ties).

    Args:
      logits_fn: ``(tokens [B, max_len] int32, position [] int32) -> [B, V]`` logits.
      batch_size: ``B``. max_len: positions to decode (static).
      eos_id: end of sequence; emitted once, then ``pad_id`` follows.

    Returns:
      :class:`Decoded` with ``tokens [B, max_len]`` and ``scores [B]`` (sum of the chosen tokens'
      log-probabilities, EOS included).
    """

    def cond(state):
        i, _, _, finished = state
        return (i < max_len) & ~jnp.all(finished)

    def body(state):
        i, tokens, score, finished = state
        logp = jax.nn.log_softmax(logits_fn(tokens, i).astype(jnp.float32), axis=-1)
        nxt = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        gained = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
        nxt = jnp.where(finished, pad_id, nxt)
        score = score + jnp.where(finished, 0.0, gained)
        tokens = lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
        return i + 1, tokens, score, finished | (nxt == eos_id)

    init = (jnp.int32(0), jnp.full((batch_size, max_len), pad_id, jnp.int32), jnp.zeros((batch_size,), jnp.float32),
            jnp.zeros((batch_size,), bool))
    _, tokens, score, _ = lax.while_loop(cond, body, init)
    return Decoded(tokens, score)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016); float32."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(logits_fn: LogitsFn, batch_size: int, max_len: int, *, beam_size: int, eos_id: int,
                pad_id: int = 0, alpha: float = 0.0) -> Decoded:
    """Beam search with ``beam_size`` hypotheses per example (see the module docstring).

    Args:
      logits_fn: ``(tokens [B * K, max_len] int32, position [] int32) -> [B * K, V]`` logits;
        row ``r`` is hypothesis ``r % K`` of example ``r // K``.
      batch_size: ``B``. max_len: positions (static). beam_size: ``K`` (at most ``V``).
      eos_id / pad_id: as :func:`greedy_decode`. alpha: length-penalty exponent (0: none).

    Returns:
      :class:`Decoded`: the best hypothesis ``tokens [B, max_len]`` and its normalized score
      ``[B]``, plus every hypothesis ``beams [B, K, max_len]`` and ``beam_scores [B, K]``.
    """
    b, k = batch_size, beam_size

    def normalized(logp, length):
        return logp if alpha == 0.0 else logp / length_penalty(length, alpha)

    def cond(state):
        i, _, _, finished, _ = state
        return (i < max_len) & ~jnp.all(finished)

    def body(state):
        i, seqs, logp, finished, length = state
        logits = logits_fn(seqs.reshape(b * k, max_len), i).astype(jnp.float32)
        v = logits.shape[-1]
        step = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, v)
        # A finished hypothesis has exactly one continuation, pad at no cost, so it survives as
        # itself (once) rather than spawning V copies.
        only_pad = jnp.where(jnp.arange(v) == pad_id, 0.0, _NEG_INF)
        step = jnp.where(finished[..., None], only_pad, step)
        cand = logp[..., None] + step  # [B, K, V]
        cand_len = jnp.broadcast_to(jnp.where(finished, length, i + 1)[..., None], cand.shape)
        flat = normalized(cand, cand_len).reshape(b, k * v)
        _, idx = lax.top_k(flat, k)  # [B, K]
        beam, tok = idx // v, (idx % v).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, beam.reshape(beam.shape + (1,) * (x.ndim - 2)), axis=1)
        was_finished = take(finished)
        seqs = take(seqs)
        seqs = lax.dynamic_update_slice_in_dim(seqs, tok[..., None], i, axis=2)
        logp = jnp.take_along_axis(cand.reshape(b, k * v), idx, axis=1)
        length = jnp.where(was_finished, take(length), i + 1)
        return i + 1, seqs, logp, was_finished | (tok == eos_id), length

    # Only hypothesis 0 is alive at the start, so the first step does not pick K copies of one token.
    logp0 = jnp.where(jnp.arange(k) == 0, 0.0, _NEG_INF)
    init = (jnp.int32(0), jnp.full((b, k, max_len), pad_id, jnp.int32), jnp.broadcast_to(logp0, (b, k)),
            jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32))
    _, seqs, logp, _, length = lax.while_loop(cond, body, init)
    scores = normalized(logp, length)
    order = jnp.argsort(-scores, axis=1)
    seqs = jnp.take_along_axis(seqs, order[..., None], axis=1)
    scores = jnp.take_along_axis(scores, order, axis=1)
    return Decoded(seqs[:, 0], scores[:, 0], seqs, scores)


def decoder_logits_fn(model, variables, image_tokens: jax.Array, repeat: int = 1) -> LogitsFn:
    """``logits_fn`` of a :class:`~contrastive_jax.models.decoder.TextDecoder` on ``image_tokens
    [B, T, d_img]``, each example repeated ``repeat`` times (the beam size) so that row ``r``
    reads example ``r // repeat``. Re-runs the decoder on the whole buffer each step and projects
    only the requested position to the vocabulary (``[N, V]``, never ``[N, L, V]``)."""
    image = jnp.repeat(image_tokens, repeat, axis=0) if repeat > 1 else image_tokens

    def next_logits(module, img, tokens, position):
        hidden = module(img, tokens)  # [N, L, W]
        h = lax.dynamic_index_in_dim(hidden, position, axis=1, keepdims=False)
        w, bias = module.output_projection()
        out = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return out if bias is None else out + bias

    return lambda tokens, position: model.apply(variables, image, tokens, position, method=next_logits)


def generate(model, variables, image_tokens: jax.Array, max_len: int, *, eos_id: int, pad_id: int = 0,
             beam_size: int = 1, alpha: float = 0.0) -> Decoded:
    """Captions for a batch of images: greedy (``beam_size=1``) or beam search.

    ``image_tokens [B, T, d_img]`` (the image tower's tokens); ``max_len`` at most the decoder's
    ``context_length``. Jit it with ``max_len``, ``eos_id``, ``beam_size``, ``alpha`` static.
    """
    b = image_tokens.shape[0]
    if beam_size == 1:
        return greedy_decode(decoder_logits_fn(model, variables, image_tokens), b, max_len,
                             eos_id=eos_id, pad_id=pad_id)
    return beam_search(decoder_logits_fn(model, variables, image_tokens, beam_size), b, max_len,
                       beam_size=beam_size, eos_id=eos_id, pad_id=pad_id, alpha=alpha)
