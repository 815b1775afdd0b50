"""contrastive_jax.parallel.sharding: regex placement rules for parameters on 8 simulated devices."""
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.parallel import make_mesh, spec_for, tree_shardings


def test_fsdp_rule_shards_largest_divisible_dim():
    mesh = make_mesh([("data", 2), ("fsdp", 4)])
    rules = [(r".*norm.*", "replicate"), (".*", "fsdp")]
    assert spec_for("block/mlp/kernel", (128, 512), rules, mesh) == P(None, "fsdp")
    assert spec_for("block/mlp/kernel", (512, 6), rules, mesh) == P("fsdp", None)
    assert spec_for("block/norm/scale", (128,), rules, mesh) == P()
    assert spec_for("odd", (3, 5), rules, mesh) == P()  # nothing divisible: replicated


def test_explicit_and_missing_rules():
    mesh = make_mesh([("data", 2), ("model", 4)])
    assert spec_for("w", (8, 16), [("w", (None, "model"))], mesh) == P(None, "model")
    with pytest.raises(ValueError, match="no sharding rule matches parameter 'x'"):
        spec_for("x", (8,), [("w", "replicate")], mesh)
    with pytest.raises(ValueError, match="not divisible"):
        spec_for("w", (8, 6), [("w", (None, "model"))], mesh)


def test_tree_shardings_use_paths():
    mesh = make_mesh([("data", 2), ("fsdp", 4)])
    tree = {"image": {"kernel": np.zeros((16, 8))}, "text": {"kernel": np.zeros((16, 8))}, "log_scale": np.zeros(())}
    sh = tree_shardings(tree, [("image/.*", "fsdp"), (".*", "replicate")], mesh)
    assert sh["image"]["kernel"].spec == P("fsdp", None)
    assert sh["text"]["kernel"].spec == P()
    assert sh["log_scale"].spec == P()
