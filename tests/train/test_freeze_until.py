"""config.optim.freeze_until: parameters held bitwise fixed for their first N updates, then trained
as usual; compared with plain float64 SGD-with-momentum written out by hand."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive_jax.train.config import default_config
from contrastive_jax.train.optim import make_optimizer

LR, MOMENTUM, WD = 0.1, 0.9, 0.01


def _optim(**over):
    c = default_config().optim
    c.update(name="sgd", lr=LR, momentum=MOMENTUM, nesterov=False, weight_decay=WD, schedule="constant",
             warmup_steps=0, grad_clip_norm=0.0)
    c.update(over)
    return c


def _grads(step):
    # Different gradient each step, so that momentum matters.
    rng = np.random.default_rng(step)
    return {"protos": rng.normal(size=(3, 2)).astype(np.float32),
            "head": {"w": rng.normal(size=(2,)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}}


def _sgd_ref(p0, grads, hold):
    """float64 SGD with coupled L2 decay and momentum (optax.sgd's trace): v = mu v + g + wd p;
    p -= lr v; during the held steps the gradient is zero and the update is dropped."""
    p, v, out = np.asarray(p0, np.float64), np.zeros(np.shape(p0)), []
    for t, g in enumerate(grads):
        if t < hold:
            v = MOMENTUM * v  # zero gradient in: the trace only decays (it is still zero here)
        else:
            v = MOMENTUM * v + (np.asarray(g, np.float64) + WD * p)
            p = p - LR * v
        out.append(p.copy())
    return out


def test_params_held_for_their_steps_then_trained_like_plain_sgd():
    params = {"protos": np.ones((3, 2), np.float32), "head": {"w": np.full((2,), 0.5, np.float32),
                                                            "b": np.zeros((2,), np.float32)}}
    tx = make_optimizer(_optim(freeze_until=[("protos", 2), ("head/b", 1)]), total_steps=10).tx
    state = tx.init(params)
    update = jax.jit(tx.update)
    p = jax.tree.map(jnp.asarray, params)
    history = []
    for t in range(4):
        u, state = update(jax.tree.map(jnp.asarray, _grads(t)), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        history.append(jax.tree.map(np.asarray, p))
    grads = [_grads(t) for t in range(4)]
    for name, hold, get in (("protos", 2, lambda d: d["protos"]), ("head/w", 0, lambda d: d["head"]["w"]),
                            ("head/b", 1, lambda d: d["head"]["b"])):
        want = _sgd_ref(get(params), [get(g) for g in grads], hold)
        for t in range(4):
            np.testing.assert_allclose(get(history[t]), want[t], rtol=1e-5, atol=1e-7, err_msg=f"{name} step {t}")
    # Held steps are bitwise no-ops (weight decay included), and the first free step moves it.
    np.testing.assert_array_equal(history[1]["protos"], params["protos"])
    assert np.abs(history[2]["protos"] - params["protos"]).min() > 0


def test_no_rule_with_steps_leaves_the_optimizer_unchanged():
    plain = make_optimizer(_optim(), total_steps=10).tx
    zero = make_optimizer(_optim(freeze_until=[("protos", 0)]), total_steps=10).tx
    params = {"protos": jnp.ones((3, 2))}
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(zero.init(params))


@pytest.mark.parametrize("value", [[("protos",)], [("protos", -1)], [("protos", 1.5)], "protos", [(3, 1)],
                                   [("(", 2)]])
def test_bad_freeze_until_names_the_field(value):
    with pytest.raises(ValueError, match=r"config\.optim\.freeze_until=.* is invalid"):
        # A fresh ConfigDict: the schema's list-typed field would refuse a str before the check.
        make_optimizer(ml_collections.ConfigDict(dict(_optim().to_dict(), freeze_until=value)), total_steps=10)


def test_schema_default_is_empty():
    assert list(default_config().optim.freeze_until) == []
