"""Device meshes, regex and logical-axis sharding rules, global-array assembly."""
from contrastive_jax.parallel.mesh import (
    batch_axes_of,
    batch_sharding,
    data_parallel_size,
    host_batch_to_global,
    make_mesh,
    replicated_batch_to_global,
    resolve_mesh_shape,
    to_host,
)
from contrastive_jax.parallel.logical import (
    PRESETS,
    activation_rules_context,
    logical_rules,
    param_shardings,
    preset_rules,
    uses_logical_rules,
    with_activation_rules,
)
from contrastive_jax.parallel.sharding import path_str, spec_for, tree_shardings

__all__ = [
    "batch_axes_of", "batch_sharding", "data_parallel_size", "host_batch_to_global", "make_mesh",
    "replicated_batch_to_global", "resolve_mesh_shape", "to_host", "path_str", "spec_for", "tree_shardings",
    "PRESETS", "activation_rules_context", "logical_rules", "param_shardings", "preset_rules",
    "uses_logical_rules", "with_activation_rules",
]
