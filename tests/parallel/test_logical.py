"""Logical-axis rules (contrastive_jax/parallel/logical.py): presets, errors, placement of boxed
parameters. (Their use in the real train step: tests/train/test_training_system.py.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.train.config import default_config


def sharding_config(logical_rules):
    cfg = default_config().sharding
    cfg.logical_rules = logical_rules  # a None field takes a str or a list, once
    return cfg


def test_logical_rules_resolution_and_errors():
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    # No 'model' axis in this mesh: the tensor rules of the preset drop to None.
    rules = dict(parallel.logical_rules(sharding_config("fsdp_tensor"), mesh))
    assert rules["embed"] == "fsdp" and rules["heads"] is None and rules["batch"] == ("data", "fsdp")
    with pytest.raises(ValueError, match="preset 'zero3'"):
        parallel.logical_rules(sharding_config("zero3"), mesh)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        parallel.logical_rules(sharding_config([("embed", "model")]), mesh)
    # Non-divisible dims stay unsharded: 6 heads on a 4-way axis.
    cfg = sharding_config([("heads", "fsdp"), ("embed", "fsdp")])
    boxed = {"k": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 6, 4), jnp.float32), ("embed", "heads", "kv"))}
    assert parallel.param_shardings(boxed, cfg, mesh)["k"].spec == P("fsdp", None, None)
    # Regex rules (logical_rules unset) keep today's behaviour on boxed params too.
    regex = parallel.param_shardings(boxed, sharding_config(None), mesh)
    assert regex["k"].spec == P("fsdp", None, None)  # largest divisible dim
