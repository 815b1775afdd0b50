"""Will it fit? Per-device memory of a config's real train step, before any hardware is used.

:func:`plan_memory` builds the step with :func:`contrastive_jax.train.build_training` (the one the
training loop runs), lowers it for a mesh of N devices on abstract arguments and reads XLA's
buffer assignment of the compiled SPMD program (``compiled.memory_analysis()``: the program of ONE
device). Memory per device is broken into

* ``params``, ``optimizer``, ``ema``, ``other_state`` and ``batch``: the bytes of each leaf's shard
  on one device, from the state's shardings (exact; no compilation needed);
* ``loss``: the temporaries of the loss's forward + backward alone (the objective on the
  embeddings, compiled on the same mesh); for ``impl='chunked'``/``'ring'`` these stay flat as
  devices grow at a fixed per-device batch, for ``'dense'`` they grow with the global batch;
* ``activations``: the rest of the step's temporaries (saved activations, gradients, optimizer
  update scratch): compiled temporaries minus ``loss`` (floored at 0, since XLA may reuse the
  loss's buffers for activations that are dead by then);
* ``outputs``: outputs not aliased to a donated input (the metrics).

Two methods:

* ``compile``: the full step is compiled (exact, seconds to minutes per config on a CPU host);
* ``extrapolate`` (``--eval-shape`` on the command line): state and batch from ``jax.eval_shape``
  shapes at full size; temporaries compiled for 1- and 2-block copies of each tower and
  extrapolated linearly in depth (a transformer's saved activations and gradients grow by one
  block's worth per block). Faster for deep unrolled towers (a scanned tower compiles one block
  whatever its depth, so those are compiled in full); within 1% of ``compile`` on
  ``configs/clip.py:vit_s16_96`` (8 devices, batch 256).

:func:`fit_config` searches micro-batch size (GradCache, ``train.microbatch_size``), remat policy
(``model.<tower>.remat``) and loss block size (``loss.block_size``, chunked/ring losses) for the
cheapest settings whose plan fits a budget, and returns them as config overrides.

Byte counts are per device, in bytes (``int``); the budget is compared with ``total`` after
leaving ``headroom`` (default 10%) for the runtime, fragmentation and the data pipeline's
prefetched batches, which buffer assignment does not see.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from typing import Any, Sequence

DEFAULT_HEADROOM = 0.10

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``'80GiB'``, ``'16GB'``, ``'512MiB'``, ``'1.5T'`` (binary), ``'1000000'`` -> bytes (int > 0).

    Raises:
      ValueError: not a positive number followed by a known unit, naming the text.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"device memory {text!r} is not a positive size such as 80GiB, 16GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes -> ``'1.23 GiB'`` (binary units)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def simulate_cpu_devices(n: int) -> None:
    """Makes the CPU backend present ``n`` devices; must run before jax initializes a backend.

    Raises:
      RuntimeError: jax already has a backend with a different device count.
    """
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()
    import sys

    if "jax" in sys.modules:
        import jax

        # Only the CPU backend is simulated; an accelerator host plans on its real devices.
        if jax.device_count() < n:
            raise RuntimeError(f"jax was initialized with {jax.device_count()} devices before {n} could be "
                               f"simulated; set XLA_FLAGS=--xla_force_host_platform_device_count={n} first")


@dataclasses.dataclass
class MemoryPlan:
    """Per-device memory of one train step (all sizes in bytes, per device).

    Attributes:
      devices: mesh size. batch_size: global batch; per_device_batch: its share on one device.
      method: ``'compile'`` (the full step compiled) or ``'extrapolate'`` (temporaries from 1-
        and 2-block towers, extrapolated in depth).
      params, optimizer, ema, other_state, batch: shard bytes of those arguments on one device.
      activations, loss, outputs: see the module docstring.
      total: the sum of the above, the planned peak.
      compiled: ``memory_analysis()`` of the full step (``argument``, ``temp``, ``output``,
        ``alias``, ``peak`` = argument + temp + output - alias), or None under ``extrapolate``.
      flops: ``cost_analysis()['flops']`` of one device's step where XLA reports it, else None.
    """

    devices: int
    batch_size: int
    per_device_batch: int
    method: str
    params: int
    optimizer: int
    ema: int
    other_state: int
    batch: int
    activations: int
    loss: int
    outputs: int
    compiled: dict | None = None
    flops: float | None = None

    @property
    def total(self) -> int:
        return (self.params + self.optimizer + self.ema + self.other_state + self.batch + self.activations
                + self.loss + self.outputs)

    def fits(self, budget: int, headroom: float = DEFAULT_HEADROOM) -> bool:
        """Whether ``total`` fits in ``budget`` bytes less ``headroom`` (a fraction)."""
        return self.total <= budget * (1.0 - headroom)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        return d


def _leaf_shard_bytes(shape_dtype, sharding) -> int:
    shape = tuple(shape_dtype.shape)
    local = sharding.shard_shape(shape) if sharding is not None else shape
    return int(math.prod(local)) * shape_dtype.dtype.itemsize


def tree_shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes on one device of a pytree of ``ShapeDtypeStruct`` placed by matching shardings."""
    import jax

    leaves = jax.tree.leaves(abstract)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
    if len(leaves) != len(shards):  # None subtrees: fall back to leaf-wise pairing
        shards = [None] * len(leaves)
    return sum(_leaf_shard_bytes(a, s) for a, s in zip(leaves, shards))


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    d = {"argument": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
         "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    d["peak"] = d["argument"] + d["temp"] + d["output"] - d["alias"]
    return d


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # not every backend reports costs
        return None


def _mesh_for(config: Any, devices: int | None):
    import jax

    from contrastive_jax.parallel.mesh import make_mesh

    n = jax.device_count() if devices is None else int(devices)
    if n < 1 or n > jax.device_count():
        from contrastive_jax.train.config import ConfigError

        raise ConfigError(f"--devices {n}: this process has {jax.device_count()} devices (1..{jax.device_count()})")
    return make_mesh(config.mesh, devices=jax.devices()[:n])


def _training(config: Any, mesh):
    from contrastive_jax.train.builder import build_training
    from contrastive_jax.train.durations import Durations

    # Lengths only shape the LR schedule, never memory: a fixed one avoids needing dataset sizes.
    durations = Durations(total=1000, warmup=10, log_every=50, eval_every=0, checkpoint_every=0, steps_per_epoch=0.0)
    return build_training(config, mesh, durations=durations)


def _loss_temporaries(training) -> int:
    """Temporaries of the objective's forward + backward on the step's embeddings (one device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from contrastive_jax import losses
    from contrastive_jax.parallel.mesh import batch_sharding

    config, mesh = training.config, training.mesh
    spec = training.batch_spec()
    inputs = [spec[k] for k in training.modalities]
    params = training.abstract_state.params

    def apply(p, *xs):
        xs = [x.astype(jnp.float32) if x.dtype == jnp.uint8 else x for x in xs]
        return training.model.apply({"params": p}, *xs, train=True, rngs={"dropout": jax.random.key(0)})

    out = jax.eval_shape(apply, params, *inputs)
    b = int(config.train.batch_size)
    data_sh, rep = batch_sharding(mesh, training.batch_axes), NamedSharding(mesh, P())
    floats = {k: v for k, v in out.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    rest = {k: v for k, v in out.items() if k not in floats}
    objective = losses.make_objective(config.loss, mesh, training.batch_axes, model_config=config.model)

    def loss_fn(f, r, batch):
        loss, _ = objective({**f, **r}, batch)
        return loss

    def sh(v):
        return data_sh if v.ndim and v.shape[0] == b else rep

    fn = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(jax.tree.map(sh, floats), jax.tree.map(sh, rest),
                                                           jax.tree.map(sh, spec)))
    return _memory(fn.lower(floats, rest, spec).compile())["temp"]


def loss_temporaries(config: Any, devices: int | None = None) -> int:
    """Per-device bytes of temporaries of ``config``'s loss (forward + backward on the embeddings
    of a global batch of ``config.train.batch_size``) on a mesh of ``devices``; the step itself is
    not compiled."""
    return _loss_temporaries(_training(config, _mesh_for(config, devices)))


def _state_parts(training) -> dict:
    st, sh = training.abstract_state, training.shardings
    parts = {"params": tree_shard_bytes(st.params, sh.params),
             "optimizer": tree_shard_bytes(st.opt_state, sh.opt_state),
             "ema": tree_shard_bytes(st.ema_params, sh.ema_params) if st.ema_params is not None else 0}
    parts["other_state"] = (tree_shard_bytes(st.step, sh.step) + tree_shard_bytes(st.rng, sh.rng)
                            + (tree_shard_bytes(st.nonfinite_steps, sh.nonfinite_steps)
                               if st.nonfinite_steps is not None else 0))
    return parts


def _batch_bytes(training) -> int:
    from contrastive_jax.parallel.mesh import batch_sharding

    spec = training.batch_spec()
    sh = batch_sharding(training.mesh, training.batch_axes)
    return sum(_leaf_shard_bytes(v, sh) for v in spec.values())


def _compile_step(training):
    return training.step.lower(training.abstract_state, training.batch_spec()).compile()


def _tower_groups(config: Any) -> list[str]:
    """Config paths of the transformer towers with a ``depth`` field (``model.image``, ...)."""
    groups = []
    for name in ("image", "text"):
        if name in config.model and "depth" in config.model[name]:
            groups.append(f"model.{name}")
    for name, tower in (config.model.get("towers", {}) or {}).items():
        if "depth" in tower:
            groups.append(f"model.towers.{name}")
    return groups


def _get(config: Any, path: str) -> Any:
    node = config
    for key in path.split("."):
        node = node[key]
    return node


def with_overrides(config: Any, overrides: dict) -> Any:
    """A deep copy of ``config`` with ``{'a.b.c': value}`` set (keys must exist)."""
    c = copy.deepcopy(config)
    for path, value in overrides.items():
        *parents, key = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[key] = value
    return c


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def plan_memory(config: Any, devices: int | None = None, *, method: str = "compile") -> MemoryPlan:
    """Plans the per-device memory of ``config``'s train step on a mesh of ``devices`` devices.

    Args:
      config: a full run config (``load_config``); ``config.mesh`` is resolved over ``devices``.
      devices: mesh size (default: every device of this process; simulate CPU devices with
        :func:`simulate_cpu_devices` before jax starts).
      method: ``'compile'`` or ``'extrapolate'`` (see the module docstring).

    Raises:
      ConfigError: a config that cannot run on that mesh (every problem named) or a bad ``devices``.
    """
    if method not in ("compile", "extrapolate"):
        raise ValueError(f"method {method!r}; known: compile, extrapolate")
    mesh = _mesh_for(config, devices)
    training = _training(config, mesh)
    parts = _state_parts(training)
    parts["batch"] = _batch_bytes(training)
    n = mesh.devices.size
    b = int(config.train.batch_size)
    from contrastive_jax.parallel.mesh import data_parallel_size

    dp = data_parallel_size(mesh, training.batch_axes)
    loss_temp = _loss_temporaries(training)
    compiled_info, flops = None, None
    groups = _tower_groups(config)
    # A scanned tower compiles one block whatever its depth: extrapolating would only add compiles.
    scanned = all(bool(_get(config, g).get("scan", False)) for g in groups)
    if method == "compile" or not groups or scanned:
        compiled = _compile_step(training)
        compiled_info, flops = _memory(compiled), _flops(compiled)
        temp = compiled_info["temp"]
        outputs = compiled_info["output"] - compiled_info["alias"]
        method = "compile"
    else:
        temp, outputs = _extrapolated_temp(config, mesh, groups)
    return MemoryPlan(devices=n, batch_size=b, per_device_batch=b // dp, method=method,
                      activations=max(temp - loss_temp, 0), loss=min(loss_temp, temp) if temp else loss_temp,
                      outputs=max(outputs, 0), compiled=compiled_info, flops=flops, **parts)


def _extrapolated_temp(config: Any, mesh, groups: Sequence[str]) -> tuple[int, int]:
    """Temporaries of the full-depth step from compiles at depth 1 and 2 of each tower (linear)."""
    depths = {g: int(_get(config, f"{g}.depth")) for g in groups}

    def temp_at(dep: dict) -> tuple[int, int]:
        c = with_overrides(config, {f"{g}.depth": d for g, d in dep.items()})
        m = _memory(_compile_step(_training(c, mesh)))
        return m["temp"], m["output"] - m["alias"]

    base_depth = {g: 1 for g in groups}
    base, outputs = temp_at(base_depth)
    total = base
    for g in groups:
        if depths[g] > 1:
            two, _ = temp_at({**base_depth, g: 2})
            total += (depths[g] - 1) * max(two - base, 0)
    return int(total), int(outputs)


# --- Fitting a budget -----------------------------------------------------------------------

REMAT_ORDER = ("none", "dots_saveable", "full")  # least recompute first


def _candidates(config: Any, dp: int) -> list[dict]:
    """Override sets to try, cheapest in recompute/communication first."""
    b = int(config.train.batch_size)
    groups = [g for g in _tower_groups(config) if "remat" in _get(config, g)]
    current = {g: str(_get(config, f"{g}.remat")) for g in groups}
    remats = [r for r in REMAT_ORDER if all(REMAT_ORDER.index(r) >= REMAT_ORDER.index(current[g]) for g in groups)]
    remats = remats if groups else [None]
    cur_mb = int(config.train.microbatch_size) or b
    mbs = [m for m in _divisors_desc(b) if m <= cur_mb and m % dp == 0]
    chunked = str(config.loss.impl) in ("chunked", "ring")
    blocks = [int(config.loss.block_size)]
    if chunked:
        blocks += [s for s in (512, 256, 128) if s < blocks[0]]
    out = []
    for mb in mbs:
        for remat in remats:
            for block in blocks:
                o = {}
                if mb != cur_mb:
                    o["train.microbatch_size"] = mb
                if remat is not None:
                    o.update({f"{g}.remat": remat for g in groups if current[g] != remat})
                if block != int(config.loss.block_size):
                    o["loss.block_size"] = block
                out.append(o)
    return out


def _divisors_desc(b: int) -> list[int]:
    return sorted({d for i in range(1, int(math.isqrt(b)) + 1) if b % i == 0 for d in (i, b // i)}, reverse=True)


@dataclasses.dataclass
class FitResult:
    """What :func:`fit_config` found: ``overrides`` (``{'train.microbatch_size': 256, ...}``; empty
    when the config already fits), the ``plan`` with them applied, and every plan ``tried``."""

    overrides: dict | None
    plan: MemoryPlan | None
    tried: list

    def override_args(self) -> list[str]:
        """``['--config.train.microbatch_size=256', ...]``."""
        return [f"--config.{k}={v}" for k, v in (self.overrides or {}).items()]


def fit_config(config: Any, devices: int | None, budget: int, *, headroom: float = DEFAULT_HEADROOM,
               method: str = "compile", max_tries: int = 24) -> FitResult:
    """Searches micro-batch size, remat policy and loss block size for a plan that fits ``budget``.

    Candidates are tried in order of cost: the largest micro-batch first (fewest GradCache passes),
    then remat ``none`` < ``dots_saveable`` < ``full`` (recompute), then smaller loss blocks; the
    first that fits wins. Overrides are never weaker than the config's own settings.

    Returns:
      A :class:`FitResult`; ``overrides`` is None when nothing tried within ``max_tries`` fits.
    """
    from contrastive_jax.parallel.mesh import batch_axes_of, data_parallel_size

    mesh = _mesh_for(config, devices)
    dp = data_parallel_size(mesh, batch_axes_of(mesh, config.sharding.batch_axes))
    tried = []
    for overrides in _candidates(config, dp)[:max_tries]:
        plan = plan_memory(with_overrides(config, overrides), devices, method=method)
        tried.append({"overrides": overrides, "total": plan.total})
        if plan.fits(budget, headroom):
            return FitResult(overrides, plan, tried)
    return FitResult(None, None, tried)
