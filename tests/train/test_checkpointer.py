"""How the Checkpointer writes replicated arrays on 8 devices: small ones whole by one replica,
large ones split among the replicas (orbax's replica-parallel save), both restored bitwise."""
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax.train.checkpoint import MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL, Checkpointer, state_type_handlers


def _slice_compiles(caplog, save):
    """Shapes of the arrays ``save()`` compiled a ``jit(slice)`` for (one entry per compile), read
    from jax's compile log."""
    caplog.clear()
    with jax.log_compiles(True):
        save()
    return [r.getMessage().split("ShapedArray(", 1)[1].split(")", 1)[0] for r in caplog.records
            if r.getMessage().startswith("Compiling jit(slice)")]


def test_small_replicated_arrays_are_written_whole_large_ones_split(tmp_path, caplog):
    replicated = NamedSharding(jax.make_mesh((8,), ("data",)), P())
    # 1 KiB (slices of 128 B) and 8 MiB (slices of 1 MiB: at the threshold, so split).
    big_rows = MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL * 8 // (4 * 512)
    small = jax.device_put(np.arange(256, dtype=np.float32).reshape(16, 16), replicated)
    big = jax.device_put(np.random.default_rng(0).normal(size=(big_rows, 512)).astype(np.float32), replicated)
    state = {"small": small, "big": big}

    ckpt = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=1, async_save=False)
    compiled = _slice_compiles(caplog, lambda: ckpt.save(1, state, {"position": 3}))
    assert compiled.count(f"float32[{big_rows},512]") == 8, compiled  # one slice per replica
    assert "float32[16,16]" not in compiled, compiled
    # orbax's default handler splits the small array too: 8 programs compiled to write 1 KiB.
    default = _slice_compiles(caplog, lambda: ocp.StandardCheckpointer().save(tmp_path / "default", {"small": small}))
    assert default.count("float32[16,16]") == 8, default

    restored, data = ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                                  {"small": replicated, "big": replicated})
    ckpt.close()
    assert data == {"position": 3}
    for key in state:
        assert restored[key].sharding == replicated
        assert np.asarray(restored[key]).tobytes() == np.asarray(state[key]).tobytes(), key
    # The format is orbax's standard one: its own checkpointer reads the item.
    plain = ocp.StandardCheckpointer().restore(tmp_path / "ckpt" / "1" / "state")
    assert np.asarray(plain["big"]).tobytes() == np.asarray(big).tobytes()


def test_state_handlers_are_orbaxs_defaults_but_for_the_threshold():
    """Guards the registry against orbax moving: every other setting of the jax.Array handler,
    and every other type's handler, is what orbax's global registry holds."""
    ours, default = state_type_handlers().get(jax.Array), ocp.type_handlers.get_type_handler(jax.Array)
    assert type(ours) is type(default)
    mine, theirs = dict(vars(ours)), dict(vars(default))  # copies: the handlers themselves stay intact
    assert mine.keys() == theirs.keys()
    assert mine.pop("_min_slice_bytes_for_replica_parallel") == MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
    assert theirs.pop("_min_slice_bytes_for_replica_parallel") is None
    for key, value in theirs.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            assert mine[key] == value, key
        else:
            assert type(mine[key]) is type(value), key
    for t in (int, float, bytes, np.float32, np.ndarray, str):
        assert state_type_handlers().get(t) is ocp.type_handlers.get_type_handler(t), t
