"""Mesh construction, regex placement rules and global-array assembly on 8 simulated devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.parallel import (
    batch_sharding,
    data_parallel_size,
    host_batch_to_global,
    make_mesh,
    resolve_mesh_shape,
    spec_for,
    tree_shardings,
)


@pytest.mark.parametrize(
    "spec, expected",
    [([("data", -1)], (8,)), ([("data", 2), ("fsdp", 4)], (2, 4)), ([("data", -1), ("fsdp", 2)], (4, 2))],
)
def test_mesh_shapes(spec, expected):
    mesh = make_mesh(spec)
    assert tuple(mesh.shape.values()) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_bad_mesh_is_rejected():
    with pytest.raises(ValueError, match="does not divide"):
        resolve_mesh_shape([("data", -1), ("fsdp", 3)], 8)
    with pytest.raises(ValueError, match="available"):
        resolve_mesh_shape([("data", 2), ("fsdp", 2)], 8)


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


@pytest.mark.parametrize("spec", [[("data", 1)], [("data", 2)], [("data", 4)], [("data", 8)], [("data", 2), ("fsdp", 4)]])
def test_host_batch_to_global_is_batch_sharded(spec):
    devices = jax.devices()[: int(np.prod([s for _, s in spec]))]
    mesh = make_mesh(spec, devices)
    axes = ("data", "fsdp")
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = host_batch_to_global({"x": x}, mesh, axes)["x"]
    np.testing.assert_array_equal(np.asarray(g), x)
    assert g.sharding == batch_sharding(mesh, axes)
    n = data_parallel_size(mesh, axes)
    assert {s.data.shape[0] for s in g.addressable_shards} == {16 // n}
