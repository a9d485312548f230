"""Everything before a run's first step, shared by training, `--mode=eval` and the benchmark: validation, the
method (with the other runs' weights it declared), the optimizer, the sharded initial state, and the jitted
train step, compiled with a fail-fast memory check.

Shapes come from the method's declared example (`Method.example_batch`), never from the data.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from vlp_jax import flops, host_memory, memory, methods, parallel, stages
from vlp_jax.checkpoint import CheckpointError, load_params
from vlp_jax.methods.base import Feature, LoadedRun, Pretrained
from vlp_jax.models import kernels, layers
from vlp_jax.optimizer import learning_rate_schedule, make_optimizer
from vlp_jax.state import TrainState, create_train_state


def validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    parallel.check_batch_size(config.train.batch_size, mesh)
    parallel.check_batch_size(config.eval.batch_size, mesh, flag="config.eval.batch_size")
    for key in ("steps", "log_every"):
        if config.train[key] <= 0:
            raise ValueError(f"config.train.{key}={config.train[key]} must be positive")
    model = config.get("model") or {}
    remat = model.get("remat", "none")
    if jax.default_backend() == "cpu" and layers.remat_policy(remat)[0] and not model.get("scan_layers", False):
        logging.warning(
            "config.model.remat=%r saves no memory on the CPU backend with unrolled blocks: XLA CPU merges each "
            "block's recomputation with its forward pass (the tiny CLIP's step keeps 458 MiB of temporaries either "
            "way). Set --config.model.scan_layers=True with it (tiny CLIP, remat='dots': 353 MiB, peak RSS 0.80 "
            "GiB instead of 0.95, the step 1.0-1.1x the time on one core).", remat)


def zeros_batch(example: dict[str, Feature], size: int = 1) -> dict[str, np.ndarray]:
    """`size` examples of zeros with the declared shapes: enough to initialise parameters."""
    return {key: np.zeros((size, *feature.shape), feature.dtype) for key, feature in example.items()}


def random_batch(example: dict[str, Feature], size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`size` random examples with the declared shapes (the benchmark's inputs): integers uniform over
    [0, values) or their dtype's range, booleans fair coins, floats uniform in [0, 1)."""
    batch = {}
    for key, feature in example.items():
        dtype, shape = np.dtype(feature.dtype), (size, *feature.shape)
        if dtype == np.bool_:
            batch[key] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            high = feature.values or int(np.iinfo(dtype).max) + 1
            batch[key] = rng.integers(0, high, shape, dtype=dtype)
        else:
            batch[key] = rng.random(shape).astype(dtype)
    return batch


def abstract_batch(example: dict[str, Feature], size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `size` examples as shapes sharded over the batch axes: the step compiles (and its
    memory is checked) from it before any data is read."""
    sharding = parallel.batch_sharding(mesh)
    return {key: jax.ShapeDtypeStruct((size, *feature.shape), np.dtype(feature.dtype), sharding=sharding)
            for key, feature in example.items()}


def load_pretrained(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, LoadedRun]:
    """The other runs' weights the configured method declares (`Method.pretrained`), read with the partial
    reader; a run directory of stages.RANDOM is an untrained stand-in built from the stage that produces it."""
    method_class = methods.get(config.method.name)
    return {name: _load_run(config, name, spec, mesh) for name, spec in method_class.pretrained(config).items()}


def _load_run(config: ml_collections.ConfigDict, name: str, spec: Pretrained, mesh: Mesh) -> LoadedRun:
    path = stages.get_key(config, spec.config_key)
    if not path:
        raise ValueError(
            f"config.{spec.config_key} is empty: {config.method.name} needs its {name} from another run. The train "
            f"loop runs the stage that produces it first (config.stages); elsewhere pass that run's --workdir, or "
            f"{stages.RANDOM!r} for an untrained one (benchmarks)"
        )
    if path == stages.RANDOM:
        return random_run(stages.producing(config, spec.config_key).make_config(config), spec.items, mesh)
    return load_run(path, spec)


def load_run(path: str, spec: Pretrained) -> LoadedRun:
    """The items `spec` names of the run in `path` (its latest checkpoint), checking its method."""
    flag = f"config.{spec.config_key}"
    first, *others = spec.items
    loaded = load_params(path, item=first, flag=flag)
    saved = loaded.config
    if spec.method and saved.method.name != spec.method:
        raise CheckpointError(
            f"{flag}={path} is a {saved.method.name!r} run, not a {spec.method!r} run; pass the --workdir of a "
            f"run of configs/{spec.method}.py"
        )
    trees = {first: loaded.tree} | {item: load_params(path, item=item, flag=flag).tree for item in others}
    return LoadedRun(saved, trees)


def random_run(run_config: ml_collections.ConfigDict, items: tuple[str, ...], mesh: Mesh) -> LoadedRun:
    """An untrained run of `run_config`'s method: its freshly initialised params and extra, on the host."""
    method = methods.build(run_config, mesh)
    example = zeros_batch(method.example_batch(run_config))
    params, extra = nn.meta.unbox(method.init(jax.random.PRNGKey(run_config.seed), example))
    trees = jax.tree.map(np.asarray, {"params": params, "extra": extra})
    return LoadedRun(run_config, {item: trees[item] for item in items})


def make_train_step(method, tx: optax.GradientTransformation, schedule, state_shardings: TrainState, mesh):
    """jit-compiled (state, batch) -> (state, metrics) with sharded inputs/outputs and the old state donated."""

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (step_metrics, extra)), grads = method.loss_and_grads(
            state.params, state.extra, batch, rng, state.step, method.config.train.get("microbatches", 1))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient skips the update: everything but the counters stays as it was.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            extra=keep(extra, state.extra),
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (1 - finite.astype(jnp.int32)),
        )
        step_metrics = {
            **step_metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "nonfinite_streak": streak,
            "nonfinite_total": new_state.nonfinite_total,
        }
        return new_state, step_metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step."""

    mesh: Mesh
    method: methods.Method
    state: TrainState
    shardings: TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics)


def setup(config: ml_collections.ConfigDict, abstract: bool = False) -> Setup:
    """Mesh, method, optimizer and the sharded initial state of `config`, shaped by the method's example;
    `abstract`: the state's shapes and shardings only (state.create_train_state)."""
    mesh = parallel.make_mesh(config.mesh)
    validate(config, mesh)
    method = methods.build(config, mesh, load_pretrained(config, mesh))
    tx = make_optimizer(config.train)
    with parallel.mesh_context(mesh):
        example = zeros_batch(method.example_batch(config))
        state, shardings = create_train_state(method, tx, example, mesh, config.seed, abstract)
    train_step = make_train_step(method, tx, learning_rate_schedule(config.train), shardings, mesh)
    return Setup(mesh, method, state, shardings, train_step)


def compile_step(run: Setup, batch, config: ml_collections.ConfigDict):
    """Compiles the train step for `batch`'s shapes (with `kernels.compiler_options`) and fails fast if it cannot fit in
    device memory.

    Returns (compiled step, memory estimate, model FLOPs per step as counted from the step's own program).
    """
    host_memory.release_host_memory()  # the state's init programs' compile memory, before the step's compile
    options = kernels.compiler_options()
    with parallel.mesh_context(run.mesh):
        lowered = run.train_step.lower(run.state, batch)
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as error:  # an XLA without this option: its default dots (the traced step is the same)
            if not options:
                raise
            logging.warning("XLA refused the compiler options %s (%s); compiling with its defaults", options, error)
            compiled = lowered.compile()
    step_flops = flops.step_flops(lowered, config)
    estimate = memory.check_fits(compiled, config.train.device_memory_bytes)
    host_memory.release_host_memory()  # the compiler's freed memory back to the OS before the step's buffers
    return compiled, estimate, step_flops
