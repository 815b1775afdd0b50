"""Training: config schema, the builder, TrainState, optimizer factory, jitted step, checkpoints,
the loop.

``build_training(config)`` builds everything a step needs (the loop and the benchmarks use it).
The loop (``train``) is imported lazily, so ``import contrastive_jax.train`` does not pull in the
data pipeline (grain, TFDS), the evaluators or tqdm.
"""
from contrastive_jax.train.builder import BuiltModel, Training, build_model, build_training, model_config_for
from contrastive_jax.train.config import ConfigError, default_config, load_config
from contrastive_jax.train.optim import Optimizer, make_optimizer, make_schedule
from contrastive_jax.train.state import TrainState, abstract_train_state, create_train_state, init_train_state, \
    state_shardings
from contrastive_jax.train.step import Placement, StepOptions, make_train_step


def train(config, workdir):
    """See :func:`contrastive_jax.train.loop.train`."""
    from contrastive_jax.train.loop import train as _train

    return _train(config, workdir)


__all__ = [
    "BuiltModel", "ConfigError", "Optimizer", "Placement", "StepOptions", "Training", "TrainState",
    "abstract_train_state", "build_model", "build_training", "create_train_state", "default_config",
    "init_train_state", "load_config", "make_optimizer", "make_schedule", "make_train_step", "model_config_for",
    "state_shardings", "train",
]
