"""The training state pytree and its creation directly in its sharded layout."""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.parallel.logical import param_shardings
from contrastive_jax.parallel.sharding import tree_shardings


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
      step: int32 scalar, number of updates applied.
      params: the model's parameter pytree (float32, unboxed).
      opt_state: the optax state for ``params``.
      rng: uint32 [2] raw PRNG key; per-step keys are ``fold_in(rng, step)`` so a resumed run
        draws the same randomness as an uninterrupted one.
      ema_params: exponential moving average of ``params`` (``config.optim.ema_decay > 0``), else
        None.
      nonfinite_steps: int32 scalar, steps whose update was skipped for a NaN/inf loss or gradient.
      loss_state: the state of a stateful objective (:class:`contrastive_jax.losses.
        StatefulObjective`: per-example temperatures, queues, ...), else None. For objectives with
        a teacher, ``ema_params`` holds the teacher (momentum encoder).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None
    nonfinite_steps: jax.Array | None = None
    loss_state: Any = None


def state_shardings(abstract_state: TrainState, tx: optax.GradientTransformation, rules: Sequence, mesh: Mesh,
                    params_sh: Any = None, loss_state_specs: Any = None) -> TrainState:
    """NamedShardings for every leaf of the state: params by ``rules`` (or the given
    ``params_sh``), optimizer moments and EMA like the parameters they track, the objective's
    state by ``loss_state_specs`` (PartitionSpecs; None: replicated), everything else (step,
    counts, rng) replicated."""
    replicated = NamedSharding(mesh, P())
    if params_sh is None:
        params_sh = tree_shardings(abstract_state.params, rules, mesh)
    # Frozen parameters (optim.freeze) appear as empty MaskedNodes in the optimizer state.
    opt_sh = optax.tree_map_params(
        tx,
        lambda leaf, sh: leaf if isinstance(leaf, optax.MaskedNode) else sh,
        abstract_state.opt_state,
        params_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    ema_sh = None if abstract_state.ema_params is None else params_sh
    loss_sh = None
    if abstract_state.loss_state is not None:
        specs = loss_state_specs if loss_state_specs is not None else jax.tree.map(lambda _: P(),
                                                                                    abstract_state.loss_state)
        loss_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated,
                      ema_params=ema_sh, nonfinite_steps=replicated, loss_state=loss_sh)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, sample_inputs: Sequence[Any], ema: bool,
             objective: Any = None):
    init_loss_state = getattr(objective, "init_state", None)
    samples = [jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype) for x in sample_inputs]

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        zeros = [jnp.zeros(s.shape, s.dtype) for s in samples]
        params = nn.meta.unbox(model.init(init_rng, *zeros)["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(state_rng) if jnp.issubdtype(state_rng.dtype, jax.dtypes.prng_key) else state_rng,
            ema_params=jax.tree.map(jnp.copy, params) if ema else None,
            nonfinite_steps=jnp.zeros((), jnp.int32),
            loss_state=None if init_loss_state is None else init_loss_state(),
        )

    return init


def _shardings(model, tx, sample_inputs, abstract, rules, mesh, sharding, loss_specs=None):
    if sharding is None:
        return state_shardings(abstract, tx, rules, mesh, loss_state_specs=loss_specs)
    # config.sharding: logical-axis rules (or its regex rules) from the boxed parameter metadata.
    zeros = [jnp.zeros((1,) + tuple(x.shape[1:]), x.dtype) for x in sample_inputs]
    boxed = jax.eval_shape(lambda r: model.init(r, *zeros), jax.random.PRNGKey(0))["params"]
    return state_shardings(abstract, tx, rules, mesh, params_sh=param_shardings(boxed, sharding, mesh),
                           loss_state_specs=loss_specs)


def abstract_train_state(
    model: nn.Module, tx: optax.GradientTransformation, sample_inputs: Sequence[Any], *, rules: Sequence,
    mesh: Mesh, ema: bool = False, sharding: Any = None, objective: Any = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[TrainState, TrainState]:
    """``(abstract_state, shardings)``: the state's shapes/dtypes (``jax.ShapeDtypeStruct``) and
    placement, without allocating anything (for restoring a checkpoint straight into place).

    ``objective``: a stateful objective (:class:`contrastive_jax.losses.StatefulObjective`) whose
    ``init_state`` becomes ``loss_state``, placed by its ``state_specs(batch_axes)``; any other
    objective (or None): ``loss_state`` is None."""
    abstract = jax.eval_shape(_init_fn(model, tx, sample_inputs, ema, objective), jax.random.PRNGKey(0))
    specs = None
    if abstract.loss_state is not None:
        specs = objective.state_specs(tuple(batch_axes) if batch_axes is not None else None)
    return abstract, _shardings(model, tx, sample_inputs, abstract, rules, mesh, sharding, specs)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, sample_inputs: Sequence[Any],
                     shardings: TrainState, *, seed: int, ema: bool = False, objective: Any = None) -> TrainState:
    """The initial state, created by one jitted init with ``out_shardings=shardings``, so no
    device ever holds an unsharded copy of the parameters. ``shardings``: from
    :func:`abstract_train_state` with the same model, ``tx``, inputs, ``ema`` and ``objective``."""
    init = _init_fn(model, tx, sample_inputs, ema, objective)
    key = jax.random.PRNGKey(seed)
    lowered = jax.jit(init, out_shardings=shardings).lower(key)
    on_cpu = all(d.platform == "cpu" for s in jax.tree.leaves(shardings) for d in s.device_set)
    return lowered.compile(compiler_options=_init_compiler_options(on_cpu))(key)


_INIT_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _init_compiler_options(on_cpu: bool) -> dict | None:
    """The init runs once, so XLA:CPU's cheaper optimization level: the quickstart's init compiled
    in 5.3 s instead of 9.0 s and gave the same bits on the machine measured (level 0 did not:
    20 of 155 arrays moved by ~1 ulp; docs/benchmarks.md, "Session 13"). A level set explicitly in
    ``XLA_FLAGS`` (``--xla_backend_optimization_level``) is the user's choice and applies to the
    init like every other program (the test suite sets 0)."""
    if not on_cpu or "--xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return None
    return _INIT_CPU_COMPILER_OPTIONS


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample_inputs: Sequence[Any],
    *,
    seed: int,
    rules: Sequence,
    mesh: Mesh,
    ema: bool = False,
    sharding: Any = None,
    objective: Any = None,
    batch_axes: Sequence[str] | None = None,
) -> tuple[TrainState, TrainState]:
    """Initializes the state already sharded (:func:`abstract_train_state`, then
    :func:`init_train_state`).

    Args:
      sample_inputs: arrays with the per-example shapes/dtypes the model is applied to (a batch
        of 1 is enough); only their shapes are used.
      ema: also hold an EMA copy of the parameters (initialized to them).
      sharding: ``config.sharding``; when given, parameters are placed by
        :func:`contrastive_jax.parallel.param_shardings` (its ``logical_rules`` if set, else its
        regex ``rules``) instead of by ``rules``.
      objective, batch_axes: a stateful objective's state becomes ``loss_state`` (see
        :func:`abstract_train_state`).

    Returns:
      ``(state, shardings)``.
    """
    _, shardings = abstract_train_state(model, tx, sample_inputs, rules=rules, mesh=mesh, ema=ema, sharding=sharding,
                                        objective=objective, batch_axes=batch_axes)
    return init_train_state(model, tx, sample_inputs, shardings, seed=seed, ema=ema, objective=objective), shardings
