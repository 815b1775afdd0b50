"""contrastive_jax.parallel.mesh: mesh construction and global-array assembly on 8 simulated devices."""
import jax
import numpy as np
import pytest

from contrastive_jax.parallel import (
    batch_sharding,
    data_parallel_size,
    host_batch_to_global,
    make_mesh,
    resolve_mesh_shape,
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
