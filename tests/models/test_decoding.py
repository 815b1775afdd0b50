"""Greedy and beam-search decoding: hand-derived outputs of a model whose next-token distribution
is set by hand (a Markov chain over the previous token), an example where beam search beats
greedy, the length penalty flipping the choice, EOS/pad handling, and the real TextDecoder decoded
under jit against a plain Python loop over its logits."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from contrastive_jax.models.decoder import TextDecoder
from contrastive_jax.models.decoding import beam_search, generate, greedy_decode, length_penalty

PAD, EOS, A, B_ = 0, 1, 2, 3
TINY = 1e-9


def markov_fn(table, start):
    """logits_fn whose next-token distribution depends only on the previous token.

    ``table[prev]`` and ``start`` are probability rows over the 4 tokens; logits are their logs,
    so the decoders' log-softmax gives back exactly these probabilities."""
    table = jnp.log(jnp.asarray(table, jnp.float32))
    start = jnp.log(jnp.asarray(start, jnp.float32))

    def fn(tokens, position):
        prev = jnp.take(tokens, jnp.maximum(position - 1, 0), axis=1)
        return jnp.where(position == 0, start[None, :], table[prev])

    return fn


def probs(**p):
    row = np.full(4, TINY)
    for name, val in p.items():
        row[{"eos": EOS, "a": A, "b": B_}[name]] = val
    return row / row.sum()


# start: a .6, b .4; after a: eos .4, a .3, b .3; after b: eos .9, a .05, b .05.
START = probs(a=0.6, b=0.4)
TABLE = [probs(eos=1.0), probs(eos=1.0), probs(eos=0.4, a=0.3, b=0.3), probs(eos=0.9, a=0.05, b=0.05)]


def test_greedy_follows_the_argmax_and_pads_after_eos():
    out = jax.jit(lambda: greedy_decode(markov_fn(TABLE, START), 2, 5, eos_id=EOS))()
    # By hand: a (0.6), then after a eos (0.4): [a, eos, pad, pad, pad], log(0.24).
    np.testing.assert_array_equal(np.asarray(out.tokens), [[A, EOS, PAD, PAD, PAD]] * 2)
    np.testing.assert_allclose(np.asarray(out.scores), np.log(0.6 * 0.4), rtol=1e-5)


def test_beam_beats_greedy_on_a_constructed_example():
    out = jax.jit(lambda: beam_search(markov_fn(TABLE, START), 2, 5, beam_size=2, eos_id=EOS))()
    # By hand, K=2: step 0 keeps a (.6), b (.4); step 1 candidates a-eos .24, a-a .18, a-b .18,
    # b-eos .36, b-a .02, b-b .02 -> b-eos (.36) and a-eos (.24), both finished.
    np.testing.assert_array_equal(np.asarray(out.tokens), [[B_, EOS, PAD, PAD, PAD]] * 2)
    np.testing.assert_allclose(np.asarray(out.scores), np.log(0.36), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.beams[0]), [[B_, EOS, 0, 0, 0], [A, EOS, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(out.beam_scores[0]), np.log([0.36, 0.24]), rtol=1e-5)
    # Beam 1 is greedy.
    one = beam_search(markov_fn(TABLE, START), 2, 5, beam_size=1, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(one.tokens), [[A, EOS, PAD, PAD, PAD]] * 2)


def test_length_penalty_prefers_the_longer_caption():
    # start: eos .5, a .49; after a: eos .99. Hypotheses: [eos] p=.5 (len 1), [a, eos] p=.4851
    # (len 2). alpha=0: [eos]. alpha=1: log(.5)/1 = -.693 < log(.4851)/(7/6) = -.620: [a, eos].
    start = probs(eos=0.5, a=0.49, b=0.01)
    table = [probs(eos=1.0), probs(eos=1.0), probs(eos=0.99, a=0.005, b=0.005), probs(eos=1.0)]
    plain = beam_search(markov_fn(table, start), 1, 4, beam_size=2, eos_id=EOS, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(plain.tokens), [[EOS, PAD, PAD, PAD]])
    np.testing.assert_allclose(float(plain.scores[0]), np.log(0.5), rtol=1e-4)
    pen = beam_search(markov_fn(table, start), 1, 4, beam_size=2, eos_id=EOS, alpha=1.0)
    np.testing.assert_array_equal(np.asarray(pen.tokens), [[A, EOS, PAD, PAD]])
    np.testing.assert_allclose(float(pen.scores[0]), np.log(0.49 * 0.99) / (7 / 6), rtol=1e-4)
    np.testing.assert_allclose(float(length_penalty(jnp.int32(2), 1.0)), 7 / 6, rtol=1e-6)


def test_max_len_without_eos():
    # Always 'a': no sequence ever finishes; the buffer fills to max_len.
    table = [probs(a=1.0)] * 4
    out = greedy_decode(markov_fn(table, probs(a=1.0)), 1, 3, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(out.tokens), [[A, A, A]])
    out = beam_search(markov_fn(table, probs(a=1.0)), 1, 3, beam_size=3, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(out.tokens), [[A, A, A]])


@pytest.mark.parametrize("beam", [1, 3])
def test_text_decoder_decoding_matches_a_python_loop(beam):
    """Greedy on a random tiny TextDecoder (jit) equals argmax over its full logits re-computed
    step by step in Python; beam search's best hypothesis scores at least greedy's (both scored
    by the model's own log-probabilities)."""
    vocab, max_len, eos = 9, 6, 1
    model = TextDecoder(vocab_size=vocab, width=16, depth=1, num_heads=2, mlp_dim=16, context_length=max_len,
                        attention_impl="einsum", output_bias=True)
    img = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    variables = model.init(jax.random.key(0), img, np.zeros((3, max_len), np.int32))
    params = nn.meta.unbox(variables["params"])
    # Larger (tied) embeddings sharpen the distributions; at this seed greedy ends example 0 with
    # EOS at position 4 and runs the others to max_len, and beam search finds better hypotheses.
    params["token_embedding"] = params["token_embedding"] * 20.0
    v = {"params": params}

    full_logits = jax.jit(lambda im, seq: model.apply(v, im, seq, method="logits"))  # [1, L, V]

    def model_logp(seq, b):
        logits = np.asarray(full_logits(img[b:b + 1], seq[None]))[0].astype(np.float64)
        return logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)

    run = jax.jit(lambda img: generate(model, v, img, max_len, eos_id=eos, beam_size=beam))
    out = run(img)
    for b in range(3):
        seq, score, done = np.zeros(max_len, np.int32), 0.0, False
        for i in range(max_len):
            if done:
                break
            lp = model_logp(seq, b)[i]
            seq[i] = int(np.argmax(lp))
            score += lp[seq[i]]
            done = seq[i] == eos
        if beam == 1:
            assert (seq[1:-1] == eos).any() == (b == 0)  # the EOS case is exercised
            np.testing.assert_array_equal(np.asarray(out.tokens[b]), seq)
            np.testing.assert_allclose(float(out.scores[b]), score, rtol=1e-4, atol=1e-4)
        else:
            best = np.asarray(out.tokens[b])
            lp = model_logp(best, b)
            n = int(np.argmax(best == eos)) + 1 if (best == eos).any() else max_len
            beam_score = sum(lp[i, best[i]] for i in range(n))
            np.testing.assert_allclose(float(out.scores[b]), beam_score, rtol=1e-4, atol=1e-4)
            assert beam_score >= score - 1e-5
