"""``config.loss`` -> the training objective: ``objective(outputs, batch) -> (loss, metrics)``.

Objectives are looked up by exact name (``config.loss.name``) in :data:`OBJECTIVES`. Each entry is a
builder ``fn(loss_config, mesh, batch_axes) -> objective``; the objective receives

* ``outputs``: the model's output dict, e.g. ``image``/``text`` ``[B, D]`` float32 L2-normalized
  embeddings and scalars ``scale`` (already exponentiated and clamped) and ``bias``;
* ``batch``: the global batch dict (for objectives that need labels or group ids),

and returns a float32 scalar loss plus a dict of float32 scalar metrics. The trainer never looks at
the loss's name, so a new objective needs only a builder registered here. A builder may instead
return a :class:`contrastive_jax.losses.StatefulObjective` (state across steps, optionally a
teacher network); the train step then threads its state through ``TrainState.loss_state``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Sequence

import jax

from jax.sharding import Mesh

from contrastive_jax.losses import objectives as O
from contrastive_jax.losses.contrastive import sigmoid_contrastive_loss, softmax_contrastive_loss
from contrastive_jax.losses.filip import IMPLS as FILIP_IMPLS
from contrastive_jax.losses.filip import filip_loss
from contrastive_jax.losses.multi import captioning_objective
from contrastive_jax.losses.stateful import is_stateful

Objective = Callable[[dict, dict], tuple[Any, dict]]
ObjectiveBuilder = Callable[[Any, "Mesh | None", "Sequence[str] | None"], Objective]


def _kw(loss_config: Any, mesh: Mesh | None, batch_axes: Sequence[str] | None) -> dict:
    """The implementation keywords every loss takes, from ``config.loss``."""
    return dict(impl=loss_config.impl, block_size=int(loss_config.block_size), mesh=mesh,
                batch_axes=tuple(batch_axes) if batch_axes is not None else None)


def _softmax(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    return lambda out, batch: softmax_contrastive_loss(out["image"], out["text"], scale=out["scale"],
                                                       return_metrics=True, **kw)


def _sigmoid(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    return lambda out, batch: sigmoid_contrastive_loss(
        out["image"], out["text"], scale=out["scale"], bias=out["bias"], return_metrics=True, **kw
    )


def _need(d: dict, key: str, where: str, what: str):
    if key not in d:
        raise KeyError(f"{what} needs {where}[{key!r}] (have: {', '.join(sorted(d))})")
    return d[key]


def _dcl(loss_config, mesh, batch_axes, sigma=0.0) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    return lambda out, batch: O.decoupled_contrastive_loss(out["image"], out["text"], scale=out["scale"], sigma=sigma, **kw)


def _dclw(loss_config, mesh, batch_axes) -> Objective:
    sigma = float(loss_config.dclw_sigma)
    if sigma <= 0:
        raise ValueError(f"config.loss.dclw_sigma must be > 0; got {sigma}")
    return _dcl(loss_config, mesh, batch_axes, sigma)


def _hard_negative(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    h = loss_config.hard_negative
    if not 0.0 <= float(h.tau_plus) < 1.0:
        raise ValueError(f"config.loss.hard_negative.tau_plus must be in [0, 1); got {h.tau_plus}")
    return lambda out, batch: O.hard_negative_loss(
        out["image"], out["text"], scale=out["scale"], beta=float(h.beta), tau_plus=float(h.tau_plus),
        fn_threshold=float(h.fn_threshold), constant_weights=bool(h.constant_weights), **kw)


def _cwcl(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    src, fn = str(loss_config.cwcl.targets), str(loss_config.cwcl.target_fn)
    if fn not in O.TARGET_FUNCTIONS:
        raise ValueError(f"unknown config.loss.cwcl.target_fn {fn!r}; known: {', '.join(sorted(O.TARGET_FUNCTIONS))}")

    def objective(out, batch):
        if src.startswith("batch:"):
            t = jax.numpy.asarray(_need(batch, src[6:], "batch", "config.loss.cwcl.targets"))
        else:
            t = _need(out, src, "outputs", "config.loss.cwcl.targets")
        return O.soft_target_loss(out["image"], out["text"], scale=out["scale"], targets=t, target_fn=fn, **kw)

    return objective


def _groups(loss_config, batch, what):
    return _need(batch, str(loss_config.group_key), "batch", f"config.loss.name={what!r} (config.loss.group_key)")


def _multi_positive(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    return lambda out, batch: O.multi_positive_loss(
        out["image"], out["text"], scale=out["scale"], groups=_groups(loss_config, batch, "multi_positive"), **kw)


def _supcon(loss_config, mesh, batch_axes) -> Objective:
    """SupCon over the views of one modality: ``outputs[simclr.views_key]`` [B, V, D] with class
    ids from the batch; every view of every same-class example is a positive."""
    kw = _kw(loss_config, mesh, batch_axes)
    key, temp = str(loss_config.simclr.views_key), float(loss_config.simclr.temperature)

    def objective(out, batch):
        v = _need(out, key, "outputs", "config.loss.name='supcon'")
        B, V, D = v.shape
        g = jax.numpy.repeat(jax.numpy.asarray(_groups(loss_config, batch, "supcon")), V)
        z = v.reshape(B * V, D)
        return O.multi_positive_loss(z, z, scale=1.0 / temp, groups=g, exclude_self=True, bidirectional=False, **kw)

    return objective


def _sigmoid_multi_positive(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    return lambda out, batch: O.sigmoid_multi_positive_loss(
        out["image"], out["text"], scale=out["scale"], bias=out["bias"],
        groups=_groups(loss_config, batch, "sigmoid_multi_positive"), **kw)


def _simclr(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    key, temp = str(loss_config.simclr.views_key), float(loss_config.simclr.temperature)
    if temp <= 0:
        raise ValueError(f"config.loss.simclr.temperature must be > 0; got {temp}")
    return lambda out, batch: O.nt_xent_loss(_need(out, key, "outputs", "config.loss.name='simclr'"),
                                             scale=1.0 / temp, **kw)


def _slip(loss_config, mesh, batch_axes) -> Objective:
    """SLIP (Mu et al. 2022, "SLIP: Self-supervision meets Language-Image Pre-training"):
    ``clip_weight * CLIP(image, text) + ssl_weight * NT-Xent(image views)``."""
    clip, ssl = _softmax(loss_config, mesh, batch_axes), _simclr(loss_config, mesh, batch_axes)
    wc, ws = float(loss_config.simclr.clip_weight), float(loss_config.simclr.ssl_weight)

    def objective(out, batch):
        lc, mc = clip(out, batch)
        ls, _ = ssl(out, batch)
        return wc * lc + ws * ls, dict(mc, clip_loss=lc, ssl_loss=ls)

    return objective


def _matryoshka(loss_config, mesh, batch_axes) -> Objective:
    """The base objective summed over nested, re-normalized prefixes (Kusupati et al. 2022).

    Every output with ndim >= 2 (embeddings ``[B, D]``, views ``[B, V, D]``) is cut, except
    ``teacher_*`` keys; scale and bias are shared by all prefixes. Metrics: the base's at each
    prefix, suffixed ``_d{dim}``.
    """
    m = loss_config.matryoshka
    dims = tuple(int(d) for d in m.dims)
    if not dims:
        raise ValueError("config.loss.name='matryoshka' needs config.model.matryoshka_dims (or loss.matryoshka.dims)")
    if str(m.base) in ("matryoshka", "symile", "filip"):
        raise ValueError(f"config.loss.matryoshka.base cannot be {m.base!r}")
    weights = tuple(float(w) for w in m.weights) or (1.0,) * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"config.loss.matryoshka.weights has {len(weights)} entries for {len(dims)} dims")
    base_cfg = loss_config.copy_and_resolve_references()
    base_cfg.name = str(m.base)
    if base_cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown config.loss.matryoshka.base {base_cfg.name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    base = OBJECTIVES[base_cfg.name](base_cfg, mesh, batch_axes)

    def objective(out, batch):
        total, metrics = 0.0, {}
        for d, w in zip(dims, weights):
            cut = {k: (O.matryoshka_prefixes(v, [d])[0] if getattr(v, "ndim", 0) >= 2 and not k.startswith("teacher")
                       else v) for k, v in out.items()}
            loss, met = base(cut, batch)
            total = total + w * loss
            metrics.update({f"{k}_d{d}": v for k, v in met.items()}, **{f"loss_d{d}": loss})
        return total, metrics

    return objective


def _symile(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    mods, neg = tuple(loss_config.symile.modalities), str(loss_config.symile.negatives)
    if neg not in ("n", "n_squared"):
        raise ValueError(f"config.loss.symile.negatives must be 'n' or 'n_squared'; got {neg!r}")
    if neg == "n_squared" and kw["impl"] != "dense":
        raise ValueError(
            f"config.loss.impl={kw['impl']!r} is not supported by symile negatives='n_squared': every anchor "
            "scores all B^(M-1) combinations of the other modalities, a dense [B, B^(M-1)] matrix; use "
            "impl='dense' or negatives='n' (streams)")
    if len(mods) < 2:
        raise ValueError(f"config.loss.symile.modalities needs >= 2 names; got {mods}")
    return lambda out, batch: O.symile_loss([_need(out, k, "outputs", "config.loss.symile.modalities") for k in mods],
                                            scale=out["scale"], negatives=neg, **kw)


def _distill(loss_config, mesh, batch_axes) -> Objective:
    kw = _kw(loss_config, mesh, batch_axes)
    d = loss_config.distill
    clip_w = float(d.clip_weight)
    clip = _softmax(loss_config, mesh, batch_axes)

    def teacher(out, batch, key):
        if key in out:
            return out[key]
        return jax.numpy.asarray(_need(batch, key, "batch (or outputs)", "config.loss.name='distill'"))

    def objective(out, batch):
        tx, ty = teacher(out, batch, str(d.teacher_image)), teacher(out, batch, str(d.teacher_text))
        loss, metrics = O.similarity_distillation_loss(out["image"], out["text"], tx, ty, scale=out["scale"],
                                                       teacher_scale=float(d.teacher_scale), **kw)
        metrics = dict(metrics, distill_kl=loss)
        if clip_w:
            lc, mc = clip(out, batch)
            loss = loss + clip_w * lc
            metrics.update(mc, clip_loss=lc)
        return loss, metrics

    return objective


def filip_options(loss_config) -> dict:
    """The checked ``config.loss`` fields of the FILIP objective: ``impl``, ``block_size``,
    ``token_fraction`` (ValueError naming the field, one line)."""
    impl, f = str(loss_config.impl), loss_config.filip
    if impl not in FILIP_IMPLS:
        raise ValueError(f"config.loss.impl={impl!r} is not supported by config.loss.name='filip'; valid: "
                         f"{', '.join(FILIP_IMPLS)}")
    block = f.block_size
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"config.loss.filip.block_size={block!r} is invalid: must be a positive integer")
    frac = f.token_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"config.loss.filip.token_fraction={frac!r} is invalid: must be in (0, 1]")
    return dict(impl=impl, block_size=int(block), token_fraction=float(frac))


def _filip(loss_config, mesh, batch_axes) -> Objective:
    """FILIP (Yao et al. 2022, "FILIP: Fine-grained Interactive Language-Image Pre-Training"):
    :func:`contrastive_jax.losses.filip_loss` on the model's ``image_tokens`` / ``text_tokens``
    ``[B, L, D]`` (unit-norm per token) with ``image_token_mask`` / ``text_token_mask`` (``[B, L]``,
    non-zero = real token), pruned by ``config.loss.filip.token_fraction`` against the pooled
    ``image`` / ``text`` embeddings.

    The trainer's model must return tokens: :func:`make_objective` with ``model_config`` rejects
    ``config.model.return_tokens=False`` (an error naming the field, not a silent switch, so the
    model config stays the one description of what the model computes). Outputs without tokens
    (a plain dict built by hand) fall back, with a warning, to the pooled embeddings as one-token
    sequences, where FILIP is exactly CLIP's InfoNCE.

    On a mesh ``chunked`` all-gathers the text tokens across the batch axes (see
    :mod:`contrastive_jax.losses.filip`); ``dense`` is left to XLA. Metrics: none beyond the loss
    (in-batch accuracies would need the B x B FILIP scores, which ``chunked`` never forms).
    """
    opts = filip_options(loss_config)
    axes = tuple(batch_axes) if batch_axes is not None else None

    def objective(out, batch):
        if "image_tokens" in out and "text_tokens" in out:
            x, y = out["image_tokens"], out["text_tokens"]
            xm = out["image_token_mask"] > 0 if "image_token_mask" in out else None
            ym = out["text_token_mask"] > 0 if "text_token_mask" in out else None
        else:
            warnings.warn("config.loss.name='filip': the model outputs hold no image_tokens / text_tokens "
                          "(config.model.return_tokens=False); the pooled embeddings are used as one-token "
                          "sequences (= CLIP InfoNCE)", stacklevel=2)
            x, y, xm, ym = out["image"][:, None], out["text"][:, None], None, None
        loss = filip_loss(x, y, scale=out["scale"], image_mask=xm, text_mask=ym, image_embed=out["image"],
                          text_embed=out["text"], mesh=mesh, batch_axes=axes, **opts)
        return loss, {}

    return objective


def _lazy(module: str) -> ObjectiveBuilder:
    """The ``build(loss_config, mesh, batch_axes)`` of ``contrastive_jax.losses.<module>``,
    imported when the objective is first built."""

    def builder(loss_config, mesh, batch_axes):
        return importlib.import_module(f"contrastive_jax.losses.{module}").build(loss_config, mesh, batch_axes)

    return builder


OBJECTIVES: dict[str, ObjectiveBuilder] = {
    "softmax": _softmax, "sigmoid": _sigmoid, "dcl": _dcl, "dclw": _dclw, "hard_negative": _hard_negative,
    "cwcl": _cwcl, "multi_positive": _multi_positive, "supcon": _supcon,
    "sigmoid_multi_positive": _sigmoid_multi_positive, "simclr": _simclr, "slip": _slip,
    "matryoshka": _matryoshka, "symile": _symile, "distill": _distill, "filip": _filip,
    # Stateful (losses.StatefulObjective): the step threads their state through TrainState.loss_state.
    "isogclr": _lazy("isogclr"), "moco": _lazy("moco"), "swav": _lazy("swav"),
    "self_distillation": _lazy("self_distill"),
    # The decoder's token cross-entropy, computed in a captioning model (CoCa / SigLIP 2).
    "captioning": lambda loss_config, mesh, batch_axes: captioning_objective,
    # 'multi' (weighted, scheduled terms) is built by make_objective itself: see losses/multi.py.
}


def register_objective(name: str, builder: ObjectiveBuilder) -> None:
    """Makes ``config.loss.name = name`` train with ``builder(config.loss, mesh, batch_axes)``."""
    OBJECTIVES[name] = builder


def _with_regularizers(objective: Objective, loss_config, mesh, batch_axes) -> Objective:
    """Adds Wang & Isola's alignment / uniformity terms (weights in config) and metrics."""
    wa, wu = float(loss_config.get("align_weight", 0.0)), float(loss_config.get("uniform_weight", 0.0))
    report = bool(loss_config.get("align_uniform_metrics", False))
    if not (wa or wu or report):
        return objective
    if is_stateful(objective):
        raise ValueError(f"config.loss.align_weight / uniform_weight / align_uniform_metrics are not supported by "
                         f"the stateful objective config.loss.name={loss_config.name!r}; leave them at 0 / False")
    t = float(loss_config.get("uniform_t", 2.0))
    kw = _kw(loss_config, mesh, batch_axes)

    def wrapped(out, batch):
        loss, metrics = objective(out, batch)
        x, y = out["image"], out["text"]
        align = O.alignment(x, y)
        unif = 0.5 * (O.uniformity(x, t=t, **kw) + O.uniformity(y, t=t, **kw))
        loss = loss + wa * align + wu * unif
        return loss, dict(metrics, alignment=jax.lax.stop_gradient(align), uniformity=jax.lax.stop_gradient(unif))

    return wrapped


def _moco_from_run(loss_config: Any, model_config: Any, train_steps: int | None) -> Any:
    """``loss.moco`` with its run-dependent zeros filled: ``embed_dim`` 0 -> the model's
    ``embed_dim``, ``momentum_steps`` 0 -> the run's length (the cosine momentum schedule)."""
    m = loss_config.moco
    fill = {}
    if int(m.get("embed_dim", 0)) == 0 and model_config is not None and model_config.get("embed_dim"):
        fill["embed_dim"] = int(model_config.get("embed_dim"))
    if int(m.get("momentum_steps", 0)) == 0 and train_steps:
        fill["momentum_steps"] = int(train_steps)
    if not fill:
        return loss_config
    loss_config = loss_config.copy_and_resolve_references()
    for k, v in fill.items():
        loss_config.moco[k] = v
    return loss_config


def make_objective(loss_config: Any, mesh: Mesh | None = None, batch_axes: Sequence[str] | None = None,
                   *, model_config: Any = None, train_steps: int | None = None) -> Objective:
    """The objective for ``config.loss`` (fields ``name``, ``impl``, ``block_size`` and any the
    objective adds; see :mod:`contrastive_jax.losses.config`).

    Args:
      mesh, batch_axes: the mesh and the axes the batch dim is split over (None: one device).
      model_config: ``config.model``; its ``matryoshka_dims`` are the Matryoshka prefixes unless
        ``loss.matryoshka.dims`` is set; ``loss.name='filip'`` requires its ``return_tokens``.
      train_steps: the run's length in steps (``loss.name='multi'`` turns its terms' start
        fractions into steps with it; the trainer passes it).

    Raises:
      ValueError: an unknown ``config.loss.name`` (the message lists the known ones), or an
        objective's invalid field / unsupported ``impl`` (the message names the field).
    """
    name = loss_config.name
    if name == "multi":
        from contrastive_jax.losses import multi

        return multi.build(loss_config, mesh, batch_axes, make_objective=make_objective, train_steps=train_steps,
                           model_config=model_config)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown config.loss.name {name!r}; known: {', '.join(sorted(OBJECTIVES))}, multi")
    if name == "filip" and model_config is not None and not model_config.get("return_tokens", False):
        raise ValueError("config.loss.name='filip' needs config.model.return_tokens=True (the towers' token "
                         "embeddings); set it, e.g. --config.model.return_tokens=true")
    if name == "moco" and "moco" in loss_config:
        loss_config = _moco_from_run(loss_config, model_config, train_steps)
    if name == "self_distillation" and model_config is not None and "self_distill" in loss_config \
            and int(loss_config.self_distill.get("dim", 0)) == 0 and model_config.get("self_distill"):
        # The heads' width is the model's (model.self_distill.dim); 0 here means "the model's".
        loss_config = loss_config.copy_and_resolve_references()
        loss_config.self_distill.dim = int(model_config.self_distill.get("dim", 0))
    if model_config is not None and "matryoshka" in loss_config and not tuple(loss_config.matryoshka.dims):
        dims = tuple(model_config.get("matryoshka_dims", ()) or ())
        if dims:
            loss_config = loss_config.copy_and_resolve_references()
            loss_config.matryoshka.dims = dims
    return _with_regularizers(OBJECTIVES[name](loss_config, mesh, batch_axes), loss_config, mesh, batch_axes)
