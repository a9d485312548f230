"""The train state pytree and its creation directly in its sharding (nothing is materialised unsharded)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlp_jax import parallel
from vlp_jax.methods.base import Batch, Method

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: PyTree
    opt_state: PyTree
    extra: PyTree  # method's non-gradient state: EMA params, queues, statistics
    rng: jax.Array  # raw uint32 [2] key; each step folds in the step number
    nonfinite_streak: jax.Array  # int32: consecutive steps skipped for a non-finite loss or gradient
    nonfinite_total: jax.Array  # int32: all such skipped steps


def example_batch(batch: Batch) -> Batch:
    """A one-row zero batch of the same feature shapes, enough to initialise parameters cheaply."""
    return {key: jnp.zeros((1, *value.shape[1:]), value.dtype) for key, value in batch.items()}


def create_train_state(
    method: Method, tx: optax.GradientTransformation, batch: Batch, mesh: Mesh, seed: int, abstract: bool = False
) -> tuple[TrainState, TrainState]:
    """Returns (state, state_shardings). Parameters follow parallel.LOGICAL_AXIS_RULES; optimizer moments
    follow their parameters; everything else is replicated. `abstract`: the state as sharded ShapeDtypeStructs,
    nothing initialised (enough to compile the step and count the parameters)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    sample = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_batch(batch))

    def init_variables(rng):
        return method.init(rng, {key: jnp.zeros(s.shape, s.dtype) for key, s in sample.items()})

    boxed_params, boxed_extra = jax.eval_shape(init_variables, init_rng)
    param_shardings = parallel.logical_shardings(boxed_params, mesh)
    extra_shardings = parallel.logical_shardings(boxed_extra, mesh)
    replicated = parallel.replicated(mesh)

    def make_state(rng, train_rng):
        params, extra = nn.meta.unbox(init_variables(rng))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=tx.init(params), extra=extra, rng=train_rng,
                          nonfinite_streak=zero, nonfinite_total=zero)

    shapes = jax.eval_shape(make_state, init_rng, train_rng)
    # Moments follow their parameters; parameter groups (optimizer.py) leave optax.MaskedNode where a group's
    # optimizer holds no state for a parameter, and the shardings tree keeps those nodes.
    opt_shardings = optax.tree_map_params(
        tx, lambda value, sharding: value if isinstance(value, optax.MaskedNode) else sharding,
        shapes.opt_state, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda value: isinstance(value, optax.MaskedNode),
    )
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, extra=extra_shardings,
                           rng=replicated, nonfinite_streak=replicated, nonfinite_total=replicated)
    if abstract:
        return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            shapes, shardings), shardings
    state = jax.jit(make_state, out_shardings=shardings)(init_rng, train_rng)
    return state, shardings


def count_params(params: PyTree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
