"""The training system: GradCache, optimizers/schedules/masks, durations, guards, checkpoints."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_jax import losses
from contrastive_jax.parallel import host_batch_to_global, make_mesh, to_host
from contrastive_jax.train import load_config, make_optimizer, make_schedule
from contrastive_jax.train.durations import resolve_durations
from contrastive_jax.train.gradcache import (
    averaged_value_and_grad,
    full_batch_value_and_grad,
    gradcache_value_and_grad,
    merge_microbatches,
    take_microbatch,
)
from contrastive_jax.train.optim import trainable_mask
from tests.train.test_train import QUICKSTART, _random_batch, build


def _config(*overrides):
    # 20 steps without warmup; texts of the length _random_batch makes.
    return load_config(QUICKSTART + ":tiny", ["loss.block_size=8", "optim.warmup_steps=0", "data.max_text_len=8",
                                              *overrides])


def _setup(config, n_devices, **kwargs):
    """``(training, initial state)`` from the loop's builder on ``n_devices`` devices."""
    training = build(config, [("data", n_devices)], n_devices, **kwargs)
    return training, training.init_state(seed=0)


# --- GradCache -------------------------------------------------------------------------------


def test_microbatch_split_is_strided_and_invertible():
    x = jnp.arange(12)
    chunks = jnp.stack([take_microbatch(x, i, 3) for i in range(3)])
    np.testing.assert_array_equal(chunks, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    np.testing.assert_array_equal(merge_microbatches(chunks), x)


@functools.lru_cache(maxsize=None)
def _gradients(loss_name, n_devices, mode, n_micro):
    config = _config(f"loss.name={loss_name}", "loss.impl=chunked")
    batch = _random_batch(32, 32, 8, seed=3)
    training, state = _setup(config, n_devices)
    mesh, model = training.mesh, training.model
    objective = losses.make_objective(config.loss, mesh, ("data",))
    fn = {"full": full_batch_value_and_grad, "gradcache": gradcache_value_and_grad,
          "average": averaged_value_and_grad}[mode]

    def apply_fn(params, inputs, rng):
        return model.apply({"params": params}, *inputs, train=True, rngs={"dropout": rng})

    @jax.jit
    def run(params, b):
        (loss, metrics, _), grads = fn(apply_fn, objective, params, [b["image"], b["text"]], b,
                                       num_microbatches=n_micro, rng=jax.random.key(0))
        return loss, metrics, grads

    loss, metrics, grads = run(state.params, host_batch_to_global(batch, mesh, ("data",)))
    return float(loss), to_host(metrics), to_host(grads)


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n_devices", [1, 8])
def test_gradcache_gradient_equals_full_batch_gradient(loss_name, n_devices):
    ref_loss, ref_metrics, ref = _gradients(loss_name, 1, "full", 1)
    loss, metrics, grads = _gradients(loss_name, n_devices, "gradcache", 4)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for key in ("i2t_top1", "t2i_top1"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), abs=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref))
    for path, a in jax.tree_util.tree_leaves_with_path(ref):
        b = _leaf(grads, path)
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6 * scale, err_msg=jax.tree_util.keystr(path))
    # The scale parameter's gradient is counted once, not once per micro-batch.
    np.testing.assert_allclose(grads["log_scale"], ref["log_scale"], rtol=1e-4)


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_averaged_microbatch_losses_change_the_contrastive_objective():
    """Plain accumulation is NOT the full-batch gradient for a contrastive loss (why GradCache)."""
    ref_loss, _, ref = _gradients("softmax", 1, "full", 1)
    loss, _, grads = _gradients("softmax", 1, "average", 4)
    # Each micro-batch of 8 has 7 negatives instead of 31: its loss is far smaller.
    assert loss < ref_loss - 0.5
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads)))
    assert diff > 1e-3


def test_train_step_with_microbatches_matches_full_batch_on_8_devices():
    config = _config("loss.impl=chunked", "optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0",
                     "optim.lr=0.5", "optim.grad_clip_norm=0")
    batch = _random_batch(32, 32, 8, seed=1)
    params = {}
    for mb in (0, 8):
        config.train.microbatch_size = mb
        training, state = _setup(config, 8)
        new_state, metrics = training.step(state, training.device_batch(batch))
        params[mb] = to_host(new_state.params)
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[8])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# --- Optimizers, schedules, masks ------------------------------------------------------------


def _schedule_config(name, **kw):
    c = load_config(None, [f"optim.schedule={name}", "optim.lr=2.0", "optim.warmup_steps=10"])
    for k, v in kw.items():
        c.optim[k] = v
    return c.optim


def _reference_lr(name, t, lr=2.0, w=10, total=100, f=0.1, timescale=50.0, decay_fraction=0.3, shape="sqrt"):
    if t < w:
        return lr * t / w
    p = min(max((t - w) / (total - w), 0.0), 1.0)
    if name == "warmup_cosine":
        return lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * p)))
    if name == "warmup_linear":
        return lr * (1 - (1 - f) * p)
    if name == "rsqrt":
        return lr / math.sqrt(1 + (t - w) / timescale)
    if name == "constant":
        return lr
    d = round(decay_fraction * total)
    q = min(max((t - (total - d)) / d, 0.0), 1.0)
    factor = {"linear": 1 - q, "cosine": 0.5 * (1 + math.cos(math.pi * q)), "sqrt": 1 - math.sqrt(q)}[shape]
    return lr * (f + (1 - f) * factor)


@pytest.mark.parametrize("name, shape", [("warmup_cosine", None), ("warmup_linear", None), ("rsqrt", None),
                                         ("constant", None), ("wsd", "sqrt"), ("wsd", "linear"), ("wsd", "cosine")])
def test_schedules_match_their_formulas(name, shape):
    extra = dict(end_lr_fraction=0.1, rsqrt_timescale=50, decay_fraction=0.3)
    if shape:
        extra["decay_shape"] = shape
    schedule = make_schedule(_schedule_config(name, **extra), 100)
    for t in (0, 5, 10, 11, 50, 69, 70, 71, 85, 99, 100):
        expected = _reference_lr(name, t, shape=shape or "sqrt")
        assert float(schedule(t)) == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, t)
    if name == "wsd":
        # Stable phase: flat at the peak right up to the decay.
        assert float(schedule(69)) == pytest.approx(2.0)
        assert float(schedule(100)) == pytest.approx(0.2, rel=1e-5)


def _toy_params():
    return {"tower": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
                      "norm": {"scale": jnp.ones((4,))}},
            "head": {"kernel": jnp.full((4, 2), 2.0)}, "log_scale": jnp.asarray(1.0)}


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars", "adafactor", "sgd", "muon"])
def test_every_optimizer_descends_a_quadratic(name):
    c = load_config(None, [f"optim.name={name}", "optim.lr=0.05", "optim.schedule=constant", "optim.weight_decay=0.0"])
    tx, _ = make_optimizer(c.optim, 100, warmup_steps=0)
    params = _toy_params()
    state = tx.init(params)

    def f(p):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    start = float(f(params))
    for _ in range(20):
        grads = jax.grad(f)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(f(params)) < 0.9 * start, name


def test_weight_decay_mask_and_lr_multipliers():
    c = load_config(None, ["optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.1", "optim.schedule=constant",
                           "optim.weight_decay=0.5", "optim.grad_clip_norm=0",
                           "optim.lr_multipliers=[('head/.*', 2.0), ('log_scale', 0.0)]"])
    tx, _ = make_optimizer(c.optim, 10, warmup_steps=0)
    params = _toy_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradient: the update is pure weight decay, -lr * wd * p, times the multiplier.
    np.testing.assert_allclose(updates["tower"]["dense"]["kernel"], -0.1 * 0.5 * 1.0)
    np.testing.assert_allclose(updates["head"]["kernel"], 2 * -0.1 * 0.5 * 2.0)
    for excluded in (updates["tower"]["dense"]["bias"], updates["tower"]["norm"]["scale"], updates["log_scale"]):
        np.testing.assert_array_equal(excluded, 0.0)


def test_frozen_params_get_no_state_and_stay_bit_identical():
    config = _config("optim.freeze=('image/.*', 'image_proj/.*')", "optim.ema_decay=0.9")
    batch = _random_batch(16, 32, 8, seed=2)
    training, state = _setup(config, 2)
    before = to_host(state.params)
    mask = trainable_mask(state.params, tuple(config.optim.freeze))
    # (Scalars excluded on both sides: the optimizer's step counters are scalars too.)
    n_trainable = sum(p.size for p, m in zip(jax.tree.leaves(before), jax.tree.leaves(mask)) if m and p.ndim)
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    # AdamW keeps two moments per TRAINABLE parameter and nothing for the frozen image tower.
    assert n_state == 2 * n_trainable, (n_state, n_trainable)
    for _ in range(2):  # the builder's step: freezing and EMA (0.9) from the config
        state, metrics = training.step(state, training.device_batch(batch))
    after = to_host(state.params)
    for name in ("image", "image_proj"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            assert np.array_equal(a, b) and a.tobytes() == b.tobytes()
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["text"]), jax.tree.leaves(after["text"])))
    assert "grad_norm/image" not in metrics and float(metrics["grad_norm/text"]) > 0
    # EMA moved towards the params but not onto them.
    ema_k = to_host(state.ema_params)["text_proj"]["kernel"]
    assert not np.array_equal(ema_k, after["text_proj"]["kernel"])
    assert not np.array_equal(ema_k, before["text_proj"]["kernel"])


def test_frozen_tower_costs_no_backward_flops():
    """LiT: the compiled step does no gradient work for a frozen image tower."""
    from contrastive_jax.train.flops import compiled_flops

    batch = _random_batch(16, 32, 8, seed=2)

    def step_flops(freeze):
        config = _config(f"optim.freeze={freeze!r}", "model.image.depth=2")
        training, state = _setup(config, 1)
        gb = training.device_batch(batch)
        image_fwd = jax.jit(lambda p, x: training.model.apply({"params": p}, x, method="encode_image"))
        # (The image forward is the same with or without freezing: compiled once.)
        return (compiled_flops(training.step.lower(state, gb).compile()),
                compiled_flops(image_fwd.lower(state.params, gb["image"]).compile()) if not freeze else None)

    full, image_fwd = step_flops(())
    frozen, _ = step_flops(("image/.*", "image_proj/.*"))
    assert image_fwd > 0
    # Backward through a tower costs about twice its forward; all of it must be gone.
    assert full - frozen > 1.5 * image_fwd, (full, frozen, image_fwd)


# --- Durations and validation ----------------------------------------------------------------


def test_durations_convert_epochs_and_examples_in_one_place():
    c = load_config(QUICKSTART + ":tiny", ["train.total_steps=-1", "train.total_epochs=3", "optim.warmup_steps=-1",
                                            "optim.warmup_examples=100", "eval.every_steps=-1", "eval.every_epochs=0.5",
                                            "checkpoint.every_steps=-1", "checkpoint.every_examples=64"])
    d = resolve_durations(c, train_examples=512)  # batch 32: 16 steps per epoch
    assert (d.total, d.warmup, d.eval_every, d.checkpoint_every) == (48, 4, 8, 2)
    c.train.total_steps = 10
    with pytest.raises(ValueError, match="total_steps.*total_epochs"):
        resolve_durations(c, 512)
    c.train.total_steps, c.train.total_epochs = -1, -1.0
    with pytest.raises(ValueError, match="run length"):
        resolve_durations(c, 512)


def test_config_that_cannot_fit_is_rejected_naming_fields():
    from contrastive_jax.train.builder import validate

    mesh = make_mesh([("data", 8)])
    for overrides, needle in ((["train.batch_size=36"], "train.batch_size=36"),
                              (["train.microbatch_size=12"], "train.microbatch_size=12 does not divide"),
                              (["train.batch_size=64", "train.microbatch_size=4"], "multiple of the data-parallel size 8")):
        with pytest.raises(ValueError, match=needle):
            validate(_config(*overrides), mesh)


# --- Non-finite guard ------------------------------------------------------------------------


def test_nonfinite_step_is_not_applied_and_counted():
    config = _config()
    batch = _random_batch(16, 32, 8, seed=4)
    training, state = _setup(config, 2, donate=False)
    step = training.step
    bad = dict(batch, image=batch["image"].copy())
    bad["image"][3, 0, 0, 0] = np.nan
    new_state, metrics = step(state, training.device_batch(bad))
    assert float(metrics["finite"]) == 0.0 and not math.isfinite(float(metrics["loss"]))
    assert int(new_state.nonfinite_steps) == 1 and int(new_state.step) == 1
    for a, b in zip(jax.tree.leaves(to_host(state.params)), jax.tree.leaves(to_host(new_state.params))):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(jax.tree.leaves(to_host(state.opt_state)), jax.tree.leaves(to_host(new_state.opt_state))):
        np.testing.assert_array_equal(a, b)
    good_state, metrics = step(new_state, training.device_batch(batch))
    assert float(metrics["finite"]) == 1.0 and int(good_state.nonfinite_steps) == 1


# --- Logical-axis sharding in the real step ---------------------------------------------------


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_train_step_under_logical_fsdp_tensor_rules_matches_one_device(optim):
    # Muon's Newton-Schulz matmuls run on matrices split over fsdp and model as well.
    config = _config("loss.impl=chunked", "sharding.logical_rules=fsdp_tensor",
                     "model.image.num_heads=2", "model.text.num_heads=2", f"optim.name={optim}")
    batch = _random_batch(16, 32, 8, seed=5)
    results = {}
    for spec in ([("data", 1)], [("data", 2), ("fsdp", 2), ("model", 2)]):
        n = int(np.prod([s for _, s in spec]))
        training = build(config, spec, n)
        assert training.batch_axes == (("data",) if n == 1 else ("data", "fsdp"))
        state, metrics = training.step(training.init_state(seed=0), training.device_batch(batch))
        results[n] = (float(metrics["loss"]), to_host(state.params), training.shardings)
    assert results[8][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[8][1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6)
    # The MLP kernels really are split over the tensor-parallel axis.
    specs = [str(s.spec) for s in jax.tree.leaves(results[8][2].params)]
    assert any("model" in s for s in specs) and any("fsdp" in s for s in specs), specs
