"""Device mesh, the one logical-axis-rules table, and shardings for pytrees and batches.

Every model parameter and activation names its dimensions logically ('embed', 'mlp', 'heads', 'batch', ...);
`LOGICAL_AXIS_RULES` below is the only place that maps those names onto mesh axes. Changing the parallelism
means changing this table or `config.mesh`, never the model code.
"""

import contextlib
import functools
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


def ring_over_batch(rows: jax.Array, visit, carry, *operands):
    """Inside shard_map: `carry = visit(carry, block, first_row, *operands)` for every replica's `rows` [b, ...] in
    turn, this replica's own first, where `first_row` is the block's first row in the gathered batch
    (`gather_batch` order). Instead of gathering them, the blocks travel round the ring of the batch axes with
    `ppermute`, one hop per replica: a replica holds its own block and one visitor, never the whole batch.

    Differentiable in `rows`, `carry` and `operands` (what `visit` reads besides the block: pass every array
    there, `visit` itself must close over nothing traced). The backward pass is ours, Inf-CL's scheme: it keeps only
    the carries entering each hop (small: per-row statistics) and sends the blocks round the ring again the other
    way, each with its gradient accumulating as it goes, which arrives home with it. So the backward pass too holds
    one visiting block at a time, O(b) where autodiff of the loop keeps every hop's block, O(B)."""
    varying = tuple(_varying(operand) for operand in operands)
    return _ring(visit, rows, carry, varying)


def _varying(x: jax.Array) -> jax.Array:
    """`x` typed as varying over the batch axes (its cotangent may then differ per replica; autodiff sums it)."""
    aval = jax.typeof(x)
    kind = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier releases call the set `vma`
    already = set(kind.varying) if kind is not None else set(getattr(aval, "vma", ()))
    missing = tuple(axis for axis in BATCH_AXES if axis not in already)
    if not _is_float(x) or not missing:
        return x
    return jax.lax.pcast(x, missing, to="varying")


def _first_row(hops: jax.Array, local: int) -> jax.Array:
    """After `hops` hops forward a replica holds replica (me - hops)'s rows: their first row in the batch."""
    replicas = jax.lax.axis_size(BATCH_AXES)
    return ((replica_index() - hops) % replicas) * local


def _ring_forward(visit, rows, carry, operands):
    """(the final carry, the carries entering each hop stacked [R, ...]): ring_over_batch's loop."""
    replicas, local = jax.lax.axis_size(BATCH_AXES), rows.shape[0]
    forward = [(i, (i + 1) % replicas) for i in range(replicas)]

    def hop(state, h):
        carry, block = state
        moved = jax.lax.ppermute(block, BATCH_AXES, forward)
        return (visit(carry, block, _first_row(h, local), *operands), moved), carry

    (carry, block), entering = jax.lax.scan(hop, (carry, rows), jnp.arange(replicas - 1))
    last = visit(carry, block, _first_row(replicas - 1, local), *operands)
    return last, jax.tree.map(lambda stack, final: jnp.concatenate([stack, final[None]]), entering, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(visit, rows, carry, operands):
    return _ring_forward(visit, rows, carry, operands)[0]


def _ring_fwd(visit, rows, carry, operands):
    last, entering = _ring_forward(visit, rows, carry, operands)
    return last, (rows, operands, entering)


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _ring_bwd(visit, residuals, cotangent):
    rows, operands, entering = residuals
    replicas, local = jax.lax.axis_size(BATCH_AXES), rows.shape[0]
    backward = [(i, (i - 1) % replicas) for i in range(replicas)]
    carry_leaves, carry_tree = jax.tree.flatten(jax.tree.map(lambda stack: stack[0], entering))
    operand_leaves, operand_tree = jax.tree.flatten(operands)

    def floats(leaves, like):  # the float cotangents only (integers have none): what the loop carries
        return [leaf for leaf, primal in zip(leaves, like, strict=True) if _is_float(primal)]

    def full(float_leaves, like, tree):  # and back, with float0 zeros for the integers
        it = iter(float_leaves)
        return jax.tree.unflatten(tree, [next(it) if _is_float(primal) else np.zeros(primal.shape, jax.dtypes.float0)
                                         for primal in like])

    def pull(h, d_carry, block):
        """The cotangents of (the carry entering hop h, its block, the operands) from the carry's leaving it."""
        carry = jax.tree.map(lambda stack: stack[h], entering)
        _, vjp = jax.vjp(lambda c, b, ops: visit(c, b, _first_row(h, local), *ops), carry, block, operands)
        d_entering, d_block, d_operands = vjp(full(d_carry, carry_leaves, carry_tree))
        return (floats(jax.tree.leaves(d_entering), carry_leaves), d_block,
                floats(jax.tree.leaves(d_operands), operand_leaves))

    def step(state, h):  # hop h in reverse: this replica holds replica (me - h)'s block and its gradient so far
        d_carry, block, d_block, d_operands = state
        d_carry, d_visit, d_ops = pull(h, d_carry, block)
        d_block, d_operands = d_block + d_visit, [a + b for a, b in zip(d_operands, d_ops, strict=True)]
        send = functools.partial(jax.lax.ppermute, axis_name=BATCH_AXES, perm=backward)
        return (d_carry, send(block), send(d_block), d_operands), None

    start = (floats(jax.tree.leaves(cotangent), carry_leaves),
             jax.lax.ppermute(rows, BATCH_AXES, backward),  # the last hop's block: replica me - (R - 1)'s
             jnp.zeros_like(rows), [jnp.zeros_like(leaf) for leaf in floats(operand_leaves, operand_leaves)])
    (d_carry, block, d_block, d_operands), _ = jax.lax.scan(step, start, jnp.arange(replicas - 1, 0, -1))
    d_carry, d_visit, d_ops = pull(0, d_carry, block)  # home: its own block, every replica's gradient gathered
    d_operands = [a + b for a, b in zip(d_operands, d_ops, strict=True)]
    return (d_block + d_visit, full(d_carry, carry_leaves, carry_tree),
            full(d_operands, operand_leaves, operand_tree))


_ring.defvjp(_ring_fwd, _ring_bwd)


def replica_index() -> jax.Array:
    """Inside shard_map: this replica's position in the gathered batch, consistent with `gather_batch`."""
    return jax.lax.axis_index(BATCH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Makes `mesh` current and activates the logical-axis rules, so activation constraints resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
