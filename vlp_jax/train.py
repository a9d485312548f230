"""The training loop only: stages, restore or initialise, step, save, log, periodic and final evaluation.

It knows a method through the Method protocol (methods/base.py) and evaluation through evaluate/run.py; setup
and the jitted step are in step.py, preemption in preemption.py, `--mode=eval` in evaluate/run.py.
"""

import signal
import time
import uuid

import jax
import ml_collections
from absl import logging
from etils import epath

from vlp_jax import checkpoint, memory, methods, metrics, parallel, stages, step
from vlp_jax.checkpoint import Checkpointer, abstract_like
from vlp_jax.data import pipeline
from vlp_jax.evaluate import run as eval_run
from vlp_jax.evaluate.context import EvalContext
from vlp_jax.evaluate.run import EVAL_DIR, Evaluations
from vlp_jax.evaluate.scope import eval_scope
from vlp_jax.flops import mfu
from vlp_jax.optimizer import learning_rate_schedule
from vlp_jax.preemption import Preempted, StopSignal, interruptible
from vlp_jax.state import TrainState, count_params

__all__ = ["EVAL_DIR", "train_and_evaluate"]


def prepare_workdir(workdir: str) -> epath.Path:
    """Creates the workdir and proves it is writable, or says which path to fix."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{uuid.uuid4().hex}"  # one per process: several may share the workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"--workdir={workdir} is not writable ({error.strerror or error}); pass a directory you can write to"
        ) from error
    return path


def restore_or_init(run: step.Setup, checkpointer: Checkpointer, batches, config) -> TrainState:
    """Resumes from the workdir's latest complete checkpoint, else warm-starts what `config.init_from` and
    `config.init` select (checkpoint.warm_start)."""
    target = abstract_like(run.state, run.shardings)
    restored = checkpointer.restore_latest(target, config)  # a damaged latest step is moved aside
    if restored is not None:
        latest, state, data_state = restored
        batches.set_state(data_state)
        log_schedule_change(checkpointer.saved_config(latest), config, latest)
        logging.info("resumed from %s (step %d, data position %s)", checkpointer.directory / str(latest), latest,
                     data_state)
        return state
    if config.init_from:
        return run.state.replace(params=checkpoint.warm_start(run.state.params, config))
    return run.state


def log_schedule_change(saved: dict, config: ml_collections.ConfigDict, step_number: int) -> None:
    """A resumed run whose train.steps changed extends (or shortens) the run: the cosine schedule is stretched to
    the new length, so the learning rate jumps; said in one warning with the figures."""
    before = saved["train"]["steps"]
    if before == config.train.steps:
        return
    old = learning_rate_schedule(ml_collections.ConfigDict({**config.train.to_dict(), "steps": before}))
    new = learning_rate_schedule(config.train)
    logging.warning("train.steps changed %d -> %d on resume: taken as an intended change of the run's length; the "
                    "learning-rate schedule is re-stretched, so at step %d it goes from %.3g to %.3g", before,
                    config.train.steps, step_number, float(old(step_number)), float(new(step_number)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None):
    """Trains `config` in `workdir` after its declared stages, resuming from its latest checkpoint; returns the
    final evaluation's headline metrics ({} with config.eval.final=False: no final evaluation).

    `stop_after` ends this invocation after that many steps (saving first) as a preemption would, and returns
    None: later invocations resume. A SIGTERM/SIGINT saves the step in flight and raises Preempted.
    """
    with StopSignal() as stop_signal:  # from the start: a signal during setup or compilation stops after step 1
        workdir = prepare_workdir(workdir)
        # e.g. COTS's visual tokenizer; the final stage's plan and memory verdict come first (preflight)
        config = stages.prepare(config, workdir, train_and_evaluate,
                                preflight=lambda stand_in: preflight(resolve_config(stand_in), stop_signal))
        return _train(resolve_config(config), workdir, stop_after, stop_signal)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as the method completes it (Method.resolve_config: e.g. fine-tuning's towers from init_from)."""
    return methods.get(config.method.name).resolve_config(config)


def preflight(config: ml_collections.ConfigDict, stop_signal: StopSignal, abstract: bool = True
              ) -> tuple[step.Setup, object, float, dict]:
    """The run's plan line and its step compiled from the method's declared example, before any data is read:
    a step that cannot fit fails in seconds (MemoryError). Returns (setup, compiled step, FLOPs per step, the
    abstract example batch); the setup's state is initialised unless `abstract` (a check only). A signal during
    the compile (minutes for a large model on a CPU) stops the run at once (Interrupted)."""
    evaluators = eval_run.declared(config)  # a misnamed evaluator fails before anything is built
    pipeline.check_paths(config)  # so does a data source or tokenizer that does not exist
    run = step.setup(config, abstract)
    mesh = run.mesh
    logging.info("plan: %s (%s) with %s parameters | mesh %s over %d %s devices | data %s | %d steps x batch %d "
                 "| evaluators %s", config.method.name, config.get("size", "custom"),
                 f"{count_params(run.state.params):,}", dict(mesh.shape), mesh.size, jax.devices()[0].platform,
                 config.data.train_sources, config.train.steps, config.train.batch_size,
                 ", ".join(evaluators) or "none")
    example = step.abstract_batch(run.method.example_batch(config), config.train.batch_size, mesh)
    with stop_signal.immediate("compiling the train step"):
        compiled, flops_per_step = interruptible(_compile, run, example, config)
    return run, compiled, flops_per_step, example


def _train(config, workdir: epath.Path, stop_after: int | None, stop_signal: StopSignal):
    scope = eval_scope(config)
    run, compiled, flops_per_step, example = preflight(config, stop_signal, abstract=False)
    mesh = run.mesh
    with stop_signal.immediate("reading the data (rendering the world, training the text tokenizer)"):
        data = pipeline.load(config, workdir, features=run.method.features(config),
                             eval_limit=scope.read_limit(config.eval.subset_size))
    batches, eval_data = data.train, data.eval
    logging.info("data: %d training examples per epoch from %s; %d eval images, %d captions", batches.epoch_length,
                 config.data.train_sources, len(eval_data), len(eval_data.captions))
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state = restore_or_init(run, checkpointer, batches, config)
    step_number = int(state.step)
    batch = parallel.global_batch_from_local(next(batches), mesh)
    if jax.tree.map(lambda x: (x.shape, x.dtype), batch) != jax.tree.map(lambda x: (x.shape, x.dtype), example):
        logging.info("the data's batch (%s) differs from the declared example (%s): compiling again",
                     sorted(batch), sorted(example))  # e.g. the world's ground-truth noisy-pair flag
        compiled, flops_per_step = _compile(run, batch, config)

    evaluations = Evaluations(EvalContext(run.method, run.shardings.params, mesh, config, data.tokenizer, scope))
    eval_subset = eval_data.first_images(config.eval.subset_size)  # scored every config.eval.every steps
    subset_name = scope.name if eval_subset is eval_data else f"{scope.name}_subset"
    writer = metrics.MetricWriter(str(workdir), enabled=jax.process_index() == 0)
    device_kind = jax.devices()[0].device_kind
    throughput = metrics.Throughput(config.train.steps, config.train.batch_size)
    last_step = config.train.steps if stop_after is None else min(config.train.steps, step_number + stop_after)
    pending = None  # the previous step's (step, non-finite streak), read one step late to keep dispatch async
    throughput.mark(step_number, time.perf_counter())
    try:
        while step_number < last_step:
            state, step_metrics = compiled(state, batch)
            step_number += 1
            if pending is not None:
                check_nonfinite(*pending, config, checkpointer)
            pending = (step_number, step_metrics["nonfinite_streak"])
            stopping = stop_signal.requested()
            if step_number % config.checkpoint.every == 0 or stopping or step_number == last_step:
                # The data position after this step's batch, before the next one is fetched.
                checkpointer.save(step_number, state, batches.get_state(), config)
            if stopping:
                checkpointer.wait()
                raise Preempted(step_number, signal.Signals(stop_signal.agreed).name)
            if step_number < last_step:
                batch = parallel.global_batch_from_local(next(batches), mesh)  # overlaps the running step
            if step_number % config.train.log_every == 0 or step_number == last_step:
                scalars = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
                throughput.mark(step_number, time.perf_counter())
                scalars["train/pairs_per_sec"] = throughput.pairs_per_sec
                scalars.update(batches.skip_metrics())  # data/skipped/<reason>, counted since the run began
                scalars["train/mfu"] = mfu(flops_per_step, throughput.step_seconds, device_kind, config.model.dtype,
                                           mesh.size)
                writer.write(step_number, scalars)
                logging.info(metrics.format_console(step_number, config.train.steps,
                                                    {**scalars, "eta": throughput.eta()}))
            if step_number < config.train.steps:
                evaluations.periodic(state, eval_subset, subset_name, step_number, writer)
                throughput.mark(step_number, time.perf_counter())  # evaluation time is not training time
        if pending is not None:
            check_nonfinite(*pending, config, checkpointer)
        if step_number < config.train.steps:
            return None
        if not config.eval.final:
            logging.info("config.eval.final=False: no full evaluation; python -m vlp_jax.main --mode=eval "
                         "--workdir=%s --config=... runs it on the last checkpoint", workdir)
            return {}
        checkpoint_dir = str(checkpointer.directory / str(step_number))
        return evaluations.full(state, eval_data, writer, step_number, workdir, checkpoint_dir, scope)
    finally:
        batches.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()


def _compile(run: step.Setup, batch, config):
    """The compiled step and its FLOPs; the memory verdict is logged (step.compile_step raises if it cannot fit)."""
    started = time.perf_counter()
    compiled, estimate, flops_per_step = step.compile_step(run, batch, config)
    logging.info("train step compiled in %.1fs; memory: needs %s per device of %s", time.perf_counter() - started,
                 memory.format_bytes(estimate.per_device_bytes), memory.format_bytes(estimate.available_bytes))
    return compiled, flops_per_step


def check_nonfinite(step_number: int, streak, config, checkpointer: Checkpointer) -> None:
    """Stops the run after `config.train.max_nonfinite_steps` skipped steps in a row."""
    streak = int(streak)
    if streak >= config.train.max_nonfinite_steps:
        raise FloatingPointError(
            f"step {step_number}: the loss or gradients were non-finite for {streak} steps in a row "
            f"(config.train.max_nonfinite_steps={config.train.max_nonfinite_steps}); those updates were skipped. "
            f"Last good checkpoint: {checkpointer.directory / str(checkpointer.latest_step())}. Lower "
            "--config.train.learning_rate, check the data, or use float32 (--config.model.dtype=float32)."
        )
