"""Counting: parameters per tower and training FLOPs per example, without allocating anything.

FLOPs are counted from the model's jaxpr (``jax.make_jaxpr`` on abstract inputs): every
``dot_general`` contributes ``2 · (product of the output dims) · (product of the contracted
dims)`` and every convolution ``2 · (output elements) · (kernel window) · (input channels per
group)``; scans multiply their body by the trip count. Elementwise work (norms, softmax,
activations) is not counted. This is the "model FLOPs" convention of MFU (Chowdhery et al.
2022, PaLM, App. B): training FLOPs = 3 × forward FLOPs (the backward does two matmuls per
forward matmul, for the input and for the weight gradient); recomputation by remat is NOT
counted, so MFU does not reward it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lc)
    out = math.prod(eqn.outvars[0].aval.shape)
    return 2 * out * contract


def _conv_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    dn = eqn.params["dimension_numbers"]
    out = math.prod(eqn.outvars[0].aval.shape)
    # rhs_spec: (out_feature_dim, in_feature_dim, *spatial dims)
    rhs_spec = dn.rhs_spec
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_per_group = rhs.shape[rhs_spec[1]]
    return 2 * out * window * in_per_group


def _sub_jaxprs(value):
    if hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns"):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr) -> int:
    """Matmul + convolution FLOPs of a (closed) jaxpr, recursing into sub-jaxprs (pjit, remat,
    custom_vjp, scan x length; of ``cond`` branches the most expensive)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        counts = [jaxpr_flops(j) for j in subs]
        if name == "cond":
            total += max(counts)
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        elif name == "custom_vjp_call" or name == "custom_jvp_call":
            total += counts[0]  # the primal function; the other jaxprs are its derivative rules
        else:
            total += sum(counts)
    return total


def forward_flops(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """Matmul/conv FLOPs of one call ``fn(*args)`` (args may be ShapeDtypeStructs)."""
    return jaxpr_flops(jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args))


def param_counts(params: Any) -> dict[str, int]:
    """Parameter count of every top-level entry of a (possibly boxed / abstract) params tree."""
    from flax import linen as nn

    params = nn.meta.unbox(params)
    return {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v))) for k, v in params.items()}


def model_summary(model, sample_inputs, *, batch_size: int | None = None) -> dict:
    """Parameters per tower and training FLOPs per example of a tower model.

    Args:
      model: a built model with ``modalities`` and ``encode`` (``models.build``).
      sample_inputs: ``ShapeDtypeStruct``s (any batch size) in ``model.modalities`` order.
      batch_size: global batch; when given, the contrastive loss's similarity matmuls
        (``6 · B · D`` FLOPs per example for fwd + bwd) are added.

    Returns:
      ``dict(towers={name: dict(params, train_flops_per_example)}, other_params, total_params,
      embed_dim, loss_train_flops_per_example, train_flops_per_example)``. A tower's params
      include its projection head (``<name>_proj``); its FLOPs are None when the model cannot
      ``encode`` that input alone (the total always counts the whole model's forward).
    """
    abstract = jax.eval_shape(model.init, jax.random.key(0), *sample_inputs)["params"]
    counts = param_counts(abstract)
    from flax import linen as nn

    plain = nn.meta.unbox(abstract)
    towers = {}
    used = set()
    b = sample_inputs[0].shape[0]
    # The whole forward (all towers and heads), as the train step runs it.
    model_fl = forward_flops(lambda p, *x: model.apply({"params": p}, *x), plain, *sample_inputs)
    outputs = jax.eval_shape(lambda p, *x: model.apply({"params": p}, *x), plain, *sample_inputs)
    embed_dim = next((int(v.shape[-1]) for k, v in outputs.items() if k not in ("scale", "bias") and v.ndim >= 2), None)
    for name, spec in zip(model.modalities, sample_inputs):
        keys = [k for k in (name, f"{name}_proj") if k in counts]
        used.update(keys)

        def enc(p, x, name=name):
            return model.apply({"params": p}, name, x, method="encode")

        try:  # per-tower FLOPs where the model can encode this input alone
            fl = int(3 * forward_flops(enc, plain, spec) / b)
        except (ValueError, TypeError):
            fl = None
        towers[name] = dict(params=int(sum(counts[k] for k in keys)), train_flops_per_example=fl)
    other = int(sum(v for k, v in counts.items() if k not in used))
    loss_flops = 0
    if batch_size and embed_dim:
        # Pairwise similarities for each pair of modalities: forward 2·B·D per example, backward 2x.
        pairs = max(len(towers) * (len(towers) - 1) // 2, 1)
        loss_flops = 6 * batch_size * embed_dim * pairs
    total_flops = int(3 * model_fl / b) + loss_flops
    return dict(
        towers=towers,
        other_params=other,
        total_params=int(sum(counts.values())),
        embed_dim=embed_dim,
        loss_train_flops_per_example=int(loss_flops),
        train_flops_per_example=int(total_flops),
    )
