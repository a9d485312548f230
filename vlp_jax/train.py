"""The generic training loop: it knows a method only through the Method protocol (methods/base.py)."""

import dataclasses
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vlp_jax import memory, methods, metrics, parallel
from vlp_jax.data import pipeline
from vlp_jax.evaluate.embeddings import RetrievalEvaluator
from vlp_jax.evaluate.retrieval import format_table
from vlp_jax.optimizer import learning_rate_schedule, make_optimizer
from vlp_jax.state import TrainState, count_params, create_train_state

EVAL_SET = "embedded"  # the synthetic world's held-out scenes


def make_train_step(method, tx: optax.GradientTransformation, schedule, state_shardings: TrainState, mesh):
    """jit-compiled (state, batch) -> (state, metrics) with sharded inputs/outputs and the old state donated."""

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (loss, (step_metrics, extra)), grads = grad_fn(state.params, state.extra, batch, rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_metrics = {
            **step_metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        return new_state, step_metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def prepare_workdir(workdir: str) -> epath.Path:
    """Creates the workdir and proves it is writable, or says which path to fix."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"--workdir={workdir} is not writable ({error.strerror or error}); pass a directory you can write to"
        ) from error
    return path


def validate(config: ml_collections.ConfigDict, mesh) -> None:
    parallel.check_batch_size(config.train.batch_size, mesh)
    parallel.check_batch_size(config.eval.batch_size, mesh, flag="config.eval.batch_size")
    for key in ("steps", "log_every"):
        if config.train[key] <= 0:
            raise ValueError(f"config.train.{key}={config.train[key]} must be positive")


def evaluate_and_log(evaluator, params, eval_data, writer, step: int) -> dict[str, float]:
    results = evaluator(params, eval_data)
    writer.write(step, {f"eval/{EVAL_SET}/{key}": value for key, value in results.items()})
    logging.info("step %d retrieval on %d held-out scenes:\n%s", step, len(eval_data.images),
                 format_table({EVAL_SET: results}))
    return results


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step; shared by training and the benchmark."""

    mesh: Mesh
    method: methods.Method
    state: TrainState
    shardings: TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics)


def setup(config: ml_collections.ConfigDict, example: dict[str, np.ndarray]) -> Setup:
    """Mesh, method, optimizer and the sharded initial state; `example` gives the batch's feature shapes."""
    mesh = parallel.make_mesh(config.mesh)
    validate(config, mesh)
    method = methods.build(config, mesh)
    tx = make_optimizer(config.train)
    with parallel.mesh_context(mesh):
        state, shardings = create_train_state(method, tx, example, mesh, config.seed)
    train_step = make_train_step(method, tx, learning_rate_schedule(config.train), shardings, mesh)
    return Setup(mesh, method, state, shardings, train_step)


def compile_step(run: Setup, batch, config: ml_collections.ConfigDict):
    """Compiles the train step for `batch`'s shapes and fails fast if it cannot fit in device memory."""
    with parallel.mesh_context(run.mesh):
        compiled = run.train_step.lower(run.state, batch).compile()
    return compiled, memory.check_fits(compiled, config.train.device_memory_bytes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` and returns the final retrieval metrics (percent)."""
    workdir = prepare_workdir(workdir)
    train_data, eval_data, _ = pipeline.load_synthetic(config, workdir)
    logging.info("data: %d train / %d eval images, %d / %d captions", len(train_data), len(eval_data),
                 len(train_data.captions), len(eval_data.captions))
    run = setup(config, {"image": train_data.images[:1], "text": train_data.captions[:1]})
    mesh, state = run.mesh, run.state
    logging.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    batches = pipeline.TrainIterator(train_data, config.train.batch_size, config.seed)
    first_batch = parallel.global_batch_from_local(next(batches), mesh)
    started = time.perf_counter()
    compiled, estimate = compile_step(run, first_batch, config)
    logging.info("%s parameters; train step compiled in %.1fs, needs %s per device of %s",
                 f"{count_params(state.params):,}", time.perf_counter() - started,
                 memory.format_bytes(estimate.per_device_bytes), memory.format_bytes(estimate.available_bytes))

    evaluator = RetrievalEvaluator(run.method, run.shardings.params, mesh, config.eval.batch_size)
    writer = metrics.MetricWriter(str(workdir))
    flops_per_step = metrics.train_flops_per_step(config.model, config.train.batch_size)
    device_kind = jax.devices()[0].device_kind
    throughput = metrics.Throughput(config.train.steps, config.train.batch_size)

    batch = first_batch
    step = 0
    throughput.mark(step, time.perf_counter())
    while step < config.train.steps:
        state, step_metrics = compiled(state, batch)
        step += 1
        if step < config.train.steps:
            batch = parallel.global_batch_from_local(next(batches), mesh)  # overlaps the running step
        if step % config.train.log_every == 0 or step == config.train.steps:
            scalars = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
            throughput.mark(step, time.perf_counter())
            scalars["train/pairs_per_sec"] = throughput.pairs_per_sec
            scalars["train/mfu"] = metrics.mfu(
                flops_per_step, throughput.step_seconds, device_kind, config.model.dtype, mesh.size
            )
            writer.write(step, scalars)
            logging.info(metrics.format_console(step, config.train.steps, {**scalars, "eta": throughput.eta()}))
        if step % config.eval.every == 0 and step < config.train.steps:
            evaluate_and_log(evaluator, state.params, eval_data, writer, step)
            throughput.mark(step, time.perf_counter())  # evaluation time is not training time
    final = evaluate_and_log(evaluator, state.params, eval_data, writer, step)
    writer.close()
    return final

