"""Device mesh, the one logical-axis-rules table, and shardings for pytrees and batches.

Every model parameter and activation names its dimensions logically ('embed', 'mlp', 'heads', 'batch', ...);
`LOGICAL_AXIS_RULES` below is the only place that maps those names onto mesh axes. Changing the parallelism
means changing this table or `config.mesh`, never the model code.
"""

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
# The batch dimension is split over both data-parallel axes; contrastive negatives are gathered over them.
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or None = replicated). Parameters: 'embed' is the FSDP-sharded dimension and the
# wide dimensions ('mlp', 'heads', 'vocab') are tensor-parallel over 'model'. Activations use 'act_*' names so a
# parameter rule never shards an activation by accident.
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("layers", None),  # the stacked axis of scanned transformer blocks (config.model.scan_layers)
    ("vocab", "model"),
    ("joint", None),
    ("length", None),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    ("act_kv", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves the configured axis sizes (-1 = the rest) against the device count, with a clear error."""
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    wildcard = [i for i, size in enumerate(sizes) if size == -1]
    if len(wildcard) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes, strict=True))}: each axis needs a positive size, and at most "
            "one may be -1 (the rest). Fix e.g. --config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.model=1"
        )
    known = math.prod(size for size in sizes if size != -1)
    if wildcard:
        if num_devices % known:
            raise ValueError(
                f"config.mesh={dict(zip(MESH_AXES, sizes, strict=True))}: {num_devices} devices are not divisible "
                f"by the fixed axes' product {known}. Set --config.mesh.* so their product divides {num_devices}."
            )
        sizes[wildcard[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available. Set --config.mesh.data=-1 to use all devices, or change the axis sizes."
        )
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp', 'model') mesh with Auto axes (linen logical partitioning needs Auto)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_parallelism(mesh: Mesh) -> int:
    """Number of replicas the batch is split over."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh, flag: str = "config.train.batch_size") -> None:
    """The global batch must split evenly over the data-parallel replicas."""
    replicas = batch_parallelism(mesh)
    if global_batch % replicas:
        raise ValueError(
            f"{flag}={global_batch} is not divisible by the {replicas} data-parallel devices "
            f"(mesh data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']}). "
            f"Use a multiple of {replicas}, e.g. --{flag}={max(replicas, global_batch // replicas * replicas)}."
        )


def logical_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a pytree whose leaves may carry logical axis metadata (unannotated = replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded on the mesh."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def gather_batch(x: jax.Array) -> jax.Array:
    """Inside shard_map: concatenates every replica's rows along axis 0 (the backward pass reduce-scatters)."""
    return jax.lax.all_gather(x, BATCH_AXES, axis=0, tiled=True)


def ring_over_batch(rows: jax.Array, visit, carry):
    """Inside shard_map: `carry = visit(carry, block, first_row)` for every replica's `rows` [b, ...] in turn, this
    replica's own first, where `first_row` is the block's first row in the gathered batch (`gather_batch` order).
    Instead of gathering them, the blocks travel round the ring of the batch axes with `ppermute`, one hop per
    replica: a replica holds its own block and one visitor, never the whole batch (the backward pass sends the
    blocks' gradients back the other way round the ring)."""
    replicas = jax.lax.axis_size(BATCH_AXES)
    me, local = replica_index(), rows.shape[0]
    forward = [(i, (i + 1) % replicas) for i in range(replicas)]

    def first_row(h):  # after h hops a replica holds replica (me - h)'s rows
        return ((me - h) % replicas) * local

    def hop(state, h):
        carry, block = state
        return (visit(carry, block, first_row(h)), jax.lax.ppermute(block, BATCH_AXES, forward)), None

    (carry, block), _ = jax.lax.scan(hop, (carry, rows), jnp.arange(replicas - 1))
    return visit(carry, block, first_row(replicas - 1))


def replica_index() -> jax.Array:
    """Inside shard_map: this replica's position in the gathered batch, consistent with `gather_batch`."""
    return jax.lax.axis_index(BATCH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Makes `mesh` current and activates the logical-axis rules, so activation constraints resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
