"""loss.name='self_distillation': DINO / iBOT cross-entropy against the centred, sharpened EMA
teacher, checked against a float64 numpy reference (value, gradient, centres over 3 steps) and
hand-derived properties."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import losses
from contrastive_jax.losses.config import defaults

TAU_S, TAU_G, TAU_P, M, WG, WP = 0.1, 0.04, 0.06, 0.9, 1.0, 0.25


def _config(**over):
    c = defaults()
    c.name = "self_distillation"
    c.self_distill.update(dim=7, student_temperature=TAU_S, teacher_temperature=TAU_G,
                          patch_teacher_temperature=TAU_P, center_momentum=M, global_weight=WG, patch_weight=WP)
    c.self_distill.update(**over)
    return c


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference(s_loc, s_pat, mask, t_glob, t_pat, c_g, c_p):
    """Float64: loss, d loss / d student logits (local, patches), new centres."""
    p_g = _softmax((t_glob - c_g) / TAU_G)  # [B, K]
    q_l = _softmax(s_loc / TAU_S)  # [B, N, K]
    ce_g = -(p_g[:, None] * np.log(q_l)).sum(-1)  # [B, N]
    p_p = _softmax((t_pat - c_p) / TAU_P)
    q_p = _softmax(s_pat / TAU_S)
    ce_p = -(p_p * np.log(q_p)).sum(-1)  # [B, T]
    loss_g, loss_p = ce_g.mean(), (mask * ce_p).sum() / mask.sum()
    # d/ds of -sum_k p_k log softmax(s / tau)_k = (softmax(s / tau) - p) / tau (sum_k p_k = 1).
    g_loc = WG * (q_l - p_g[:, None]) / TAU_S / ce_g.size
    g_pat = WP * mask[..., None] * (q_p - p_p) / TAU_S / mask.sum()
    new_c_g = M * c_g + (1 - M) * t_glob.mean(0)
    new_c_p = M * c_p + (1 - M) * t_pat.mean((0, 1))
    return WG * loss_g + WP * loss_p, loss_g, loss_p, g_loc, g_pat, new_c_g, new_c_p


def _outputs(s_loc, s_pat, mask, t_glob, t_pat):
    f = lambda a: jnp.asarray(a, jnp.float32)
    return {"distill_local": f(s_loc), "distill_patches": f(s_pat), "distill_mask": f(mask),
            "teacher": {"distill_global": f(t_glob), "distill_patches": f(t_pat)}}


def test_value_gradient_and_centres_match_a_float64_reference_over_three_steps():
    obj = losses.make_objective(_config())
    assert losses.is_stateful(obj) and obj.teacher and obj.teacher_method == "distill_teacher"
    rng = np.random.default_rng(0)
    B, N, T, K = 4, 3, 5, 7
    state = obj.init_state()
    c_g, c_p = np.zeros(K), np.zeros(K)
    for step in range(3):
        s_loc, s_pat = rng.normal(size=(B, N, K)), rng.normal(size=(B, T, K))
        t_glob, t_pat = rng.normal(size=(B, K)) + 0.5, rng.normal(size=(B, T, K)) - 0.3
        mask = (rng.uniform(size=(B, T)) < 0.5).astype(np.float64)
        mask[0, 0] = 1.0
        out = _outputs(s_loc, s_pat, mask, t_glob, t_pat)

        def fn(student):
            loss, metrics, new_state = obj(dict(out, **student), {}, state, jnp.int32(step))
            return loss, (metrics, new_state)

        student = {"distill_local": out["distill_local"], "distill_patches": out["distill_patches"]}
        (loss, (metrics, new_state)), grads = jax.value_and_grad(fn, has_aux=True)(student)
        want, want_g, want_p, g_loc, g_pat, c_g, c_p = _reference(s_loc, s_pat, mask, t_glob, t_pat, c_g, c_p)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)
        np.testing.assert_allclose(float(metrics["loss_global"]), want_g, rtol=2e-5)
        np.testing.assert_allclose(float(metrics["loss_patch"]), want_p, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(grads["distill_local"]), g_loc, rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(np.asarray(grads["distill_patches"]), g_pat, rtol=2e-4, atol=1e-7)
        # The centres used by the next step: EMA of the teacher's batch-mean logits.
        np.testing.assert_allclose(np.asarray(new_state["center_global"]), c_g, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(new_state["center_patch"]), c_p, rtol=1e-5, atol=1e-7)
        state = new_state
    assert np.abs(c_g).max() > 0.1  # the centres moved, so steps 2 and 3 tested centring too


def test_uniform_teacher_and_student_give_log_k_and_unmasked_patches_get_no_gradient():
    obj = losses.make_objective(_config())
    rng = np.random.default_rng(1)
    B, N, T, K = 2, 2, 6, 7
    # Constant rows (any constant): both distributions uniform, so H(p, q) = log K exactly.
    const = lambda shape: np.broadcast_to(rng.normal(size=shape[:-1] + (1,)), shape)
    mask = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], np.float64)
    out = _outputs(const((B, N, K)), const((B, T, K)), mask, const((B, K)), const((B, T, K)))
    loss, metrics, _ = obj(out, {}, obj.init_state(), jnp.int32(0))
    np.testing.assert_allclose(float(metrics["loss_global"]), math.log(K), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss_patch"]), math.log(K), rtol=1e-6)
    np.testing.assert_allclose(float(loss), (WG + WP) * math.log(K), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["teacher_entropy_patch"]), math.log(K), rtol=1e-6)
    # Random logits: the patch gradient is exactly zero where nothing was masked.
    out = _outputs(rng.normal(size=(B, N, K)), rng.normal(size=(B, T, K)), mask, rng.normal(size=(B, K)),
                   rng.normal(size=(B, T, K)))
    g = jax.grad(lambda s: obj(dict(out, distill_patches=s), {}, obj.init_state(), jnp.int32(0))[0])(
        out["distill_patches"])
    g = np.asarray(g)
    assert np.all(g[mask == 0] == 0.0)
    assert np.all(np.abs(g[mask == 1]).sum(-1) > 0)


def test_teacher_decay_copies_the_student_before_the_start_then_follows_the_schedule():
    const = losses.make_objective(_config(momentum=0.99, teacher_start_steps=4))
    assert [float(const.teacher_decay(jnp.int32(s))) for s in (0, 3, 4, 100)] == [0.0, 0.0, np.float32(0.99),
                                                                                   np.float32(0.99)]
    cos = losses.make_objective(_config(momentum=0.9, momentum_schedule="cosine", momentum_steps=14,
                                        teacher_start_steps=4))
    for s in (0, 4, 9, 14, 20):
        u = min(max(s - 4, 0), 10) / 10
        want = 0.0 if s < 4 else 1 - 0.1 * (1 + math.cos(math.pi * u)) / 2
        np.testing.assert_allclose(float(cos.teacher_decay(jnp.int32(s))), want, rtol=1e-6)


@pytest.mark.parametrize("field,value", [("dim", 0), ("student_temperature", 0.0), ("center_momentum", 1.5),
                                         ("momentum_schedule", "linear"), ("patch_weight", -1.0)])
def test_invalid_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"config.loss.self_distill.{field}="):
        losses.make_objective(_config(**{field: value}))
