"""Training: config schema, TrainState, optimizer factory, jitted step, checkpointing, loop.

The loop (``train``) is imported lazily so that ``from contrastive_jax.train import ...`` of the
pure pieces does not pull in data and evaluation.
"""
from contrastive_jax.train.config import ConfigError, default_config, load_config
from contrastive_jax.train.optim import make_optimizer, make_schedule
from contrastive_jax.train.state import TrainState, create_train_state, state_shardings
from contrastive_jax.train.step import make_train_step


def train(config, workdir):
    """See :func:`contrastive_jax.train.loop.train`."""
    from contrastive_jax.train.loop import train as _train

    return _train(config, workdir)


__all__ = [
    "ConfigError", "default_config", "load_config", "make_optimizer", "make_schedule", "TrainState",
    "create_train_state", "state_shardings", "make_train_step", "train",
]
