"""The generic training loop: it knows a method only through the Method protocol (methods/base.py)."""

import dataclasses
import functools
import signal
import time
import uuid
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlp_jax import memory, methods, metrics, parallel
from vlp_jax.checkpoint import Checkpointer, absolute, abstract_like, open_existing
from vlp_jax.data import pipeline
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.evaluate.retrieval import format_table
from vlp_jax.evaluate.scope import EvalScope, capped, eval_batch_size, eval_scope, records_available
from vlp_jax.evaluate.suite import EvalSuite, save_report
from vlp_jax.optimizer import learning_rate_schedule, make_optimizer
from vlp_jax.state import TrainState, count_params, create_train_state

EVAL_DIR = "eval"  # <workdir>/eval/step_<N>.json and .png: the full evaluation's report and retrieval picture


def make_train_step(method, tx: optax.GradientTransformation, schedule, state_shardings: TrainState, mesh):
    """jit-compiled (state, batch) -> (state, metrics) with sharded inputs/outputs and the old state donated."""

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (loss, (step_metrics, extra)), grads = grad_fn(state.params, state.extra, batch, rng, state.step)
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


def validate(config: ml_collections.ConfigDict, mesh) -> None:
    parallel.check_batch_size(config.train.batch_size, mesh)
    parallel.check_batch_size(config.eval.batch_size, mesh, flag="config.eval.batch_size")
    for key in ("steps", "log_every"):
        if config.train[key] <= 0:
            raise ValueError(f"config.train.{key}={config.train[key]} must be positive")


def make_evaluator(method, param_shardings, mesh: Mesh, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    """The method's own evaluator when it defines one (see methods/base.py), else the retrieval suite.

    Either is called as evaluator(params, extra, eval_dataset) -> dict[str, float].
    """
    factory = getattr(method, "make_evaluator", None)
    if factory is not None:
        return factory(param_shardings, mesh, eval_batch_size(config, mesh))
    return EvalSuite(method, param_shardings, mesh, config, tokenizer)


def evaluate_and_log(evaluator, state: TrainState, eval_data, writer, step: int, name: str):
    """Scores `eval_data` (named `name` in the logs and as eval/<name>/<metric>) and returns the results."""
    results = evaluator(state.params, state.extra, eval_data)
    writer.write(step, {f"eval/{name}/{key}": value for key, value in results.items()})
    if isinstance(evaluator, EvalSuite):
        table = format_table({name: results})
    else:
        table = "  ".join(f"{key}={value:.4g}" for key, value in results.items())
    logging.info("step %d evaluation on %d held-out images:\n%s", step, len(eval_data.images), table)
    return results


def evaluate_fully(
    evaluator, state: TrainState, eval_data, writer, step: int, workdir: epath.Path, checkpoint: str,
    scope: EvalScope,
) -> dict[str, float]:
    """The end-of-run evaluation, also `--mode=eval`; returns the eval set's retrieval metrics.

    It reads at most `scope.limit` eval images (scope.eval_scope) and names the set `scope.name`. With the
    retrieval suite: retrieval, unimodal, zero-shot and efficiency (see evaluate/suite.py) as scalars, the
    retrieval picture in TensorBoard, and <workdir>/eval/step_<step>.json / .png. A method's own evaluator: its
    results, also as the JSON report. `checkpoint` names the evaluated checkpoint in the report.
    """
    directory = workdir / EVAL_DIR
    name, available = scope.name, records_available(eval_data)
    eval_data = capped(eval_data, scope)
    head = {"checkpoint": checkpoint, "eval_set": {"name": name, "images": len(eval_data), "available": available}}
    if not isinstance(evaluator, EvalSuite):
        results = evaluate_and_log(evaluator, state, eval_data, writer, step, name)
        if jax.process_index() == 0:
            save_report(directory, step, {**head, "sets": {name: results}})
        return results
    evaluation = evaluator.full(state.params, eval_data, name)
    writer.write(step, evaluation.scalars())
    writer.write_image(step, f"eval/{name}/retrieval", evaluation.picture)
    if jax.process_index() == 0:
        report = save_report(directory, step, {**head, **evaluation.report}, evaluation.picture)
        logging.info("step %d full evaluation (report %s):\n%s", step, report, evaluation.summary())
    return evaluation.report["sets"][name]["retrieval"]


def find_checkpoint(path: str, flag: str) -> tuple[epath.Path, int]:
    """(run directory, step) of `path`: a run's workdir (its latest checkpoint) or one <workdir>/checkpoints/<step>.

    `flag` names the command-line flag `path` came from, for the error messages.
    """
    path = absolute(path)
    if (path / "checkpoints").is_dir():
        checkpointer = Checkpointer(path, ml_collections.ConfigDict(dict(keep=None, keep_every=0, use_async=False)))
        latest = checkpointer.latest_step()
        checkpointer.close()
        if latest is None:
            raise FileNotFoundError(f"{flag}={path} holds no complete checkpoint to evaluate; train first")
        return path, latest
    if path.name.isdigit() and path.parent.name == "checkpoints" and path.is_dir():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{flag}={path} is neither a run directory (holding checkpoints/) nor one of its checkpoints "
        "(<workdir>/checkpoints/<step>); pass one of those, or train first (--mode=train)"
    )


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
    """Compiles the train step for `batch`'s shapes and fails fast if it cannot fit in device memory.

    Returns (compiled step, memory estimate, model FLOPs per step as counted from the step's own program).
    """
    with parallel.mesh_context(run.mesh):
        lowered = run.train_step.lower(run.state, batch)
        compiled = lowered.compile()
    flops = metrics.step_flops(lowered, config)
    return compiled, memory.check_fits(compiled, config.train.device_memory_bytes), flops


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved itself and should be restarted (e.g. requeued by SLURM)


class Preempted(Exception):
    """Raised after the state was saved because the process was asked to stop (SIGTERM/SIGINT)."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"received {signal_name}: saved step {step}; rerun the same command to resume")
        self.step = step


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can finish its step and save; all processes agree."""

    def __init__(self):
        self.received: int | None = None  # set by the handler: the signal this process received
        self.agreed: int | None = None  # set by `requested`: the signal every process stops for
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def requested(self) -> bool:
        """Whether any process received a signal. Multi-process: a collective that every process calls once per
        step, so a signal sent to one process stops all of them after the same step."""
        signum = self.received or 0  # read once: a signal arriving during the collective counts at the next step
        if jax.process_count() > 1:
            signum = int(np.max(multihost_utils.process_allgather(np.array(signum))))  # max over [processes]
        self.agreed = signum or None
        return self.agreed is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()


def restore_or_init(run: Setup, checkpointer: Checkpointer, batches, config) -> TrainState:
    """Resumes from the workdir's latest complete checkpoint, else warm-starts params from `init_from`."""
    target = abstract_like(run.state, run.shardings)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(latest, target, config)
        batches.set_state(data_state)
        logging.info("resumed from %s (step %d, data position %s)", checkpointer.directory / str(latest), latest,
                     data_state)
        return state
    if config.init_from:
        source = open_existing(config.init_from)
        params = source.restore(source.latest_step(), target)[0].params
        logging.info("warm-started parameters from %s step %d", source.directory, source.latest_step())
        return run.state.replace(params=params)
    return run.state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None):
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final retrieval metrics
    ({} with config.eval.final=False: no final evaluation).

    `stop_after` ends this invocation after that many steps (saving first) as a preemption would, and returns
    None: later invocations resume. A SIGTERM/SIGINT saves the step in flight and raises Preempted.
    """
    with StopSignal() as stop_signal:  # from the start: a signal during setup or compilation stops after step 1
        return _train_and_evaluate(config, workdir, stop_after, stop_signal)


def _train_and_evaluate(config, workdir: str, stop_after: int | None, stop_signal: StopSignal):
    workdir = prepare_workdir(workdir)
    config = methods.prepare(config, workdir, train_and_evaluate)  # earlier stages, e.g. COTS's visual tokenizer
    scope = eval_scope(config)
    data = pipeline.load(config, workdir, eval_limit=scope.read_limit(config.eval.subset_size))
    batches, eval_data = data.train, data.eval
    logging.info("data: %d training examples per epoch from %s; %d eval images, %d captions", batches.epoch_length,
                 config.data.train_sources, len(eval_data), len(eval_data.captions))
    run = setup(config, {"image": eval_data.images[:1], "text": eval_data.captions[:1]})
    mesh = run.mesh
    logging.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state = restore_or_init(run, checkpointer, batches, config)
    step = int(state.step)
    batch = parallel.global_batch_from_local(next(batches), mesh)
    started = time.perf_counter()
    compiled, estimate, flops_per_step = compile_step(run, batch, config)
    logging.info("%s parameters; train step compiled in %.1fs, needs %s per device of %s",
                 f"{count_params(state.params):,}", time.perf_counter() - started,
                 memory.format_bytes(estimate.per_device_bytes), memory.format_bytes(estimate.available_bytes))

    evaluator = make_evaluator(run.method, run.shardings.params, mesh, config, data.tokenizer)
    eval_subset = eval_data.first_images(config.eval.subset_size)  # scored every config.eval.every steps
    subset_name = scope.name if eval_subset is eval_data else f"{scope.name}_subset"
    writer = metrics.MetricWriter(str(workdir), enabled=jax.process_index() == 0)
    device_kind = jax.devices()[0].device_kind
    throughput = metrics.Throughput(config.train.steps, config.train.batch_size)
    last_step = config.train.steps if stop_after is None else min(config.train.steps, step + stop_after)
    pending = None  # the previous step's (step, non-finite streak), read one step late to keep dispatch async
    throughput.mark(step, time.perf_counter())
    try:
        while step < last_step:
            state, step_metrics = compiled(state, batch)
            step += 1
            if pending is not None:
                check_nonfinite(*pending, config, checkpointer)
            pending = (step, step_metrics["nonfinite_streak"])
            stopping = stop_signal.requested()
            if step % config.checkpoint.every == 0 or stopping or step == last_step:
                # The data position after this step's batch, before the next one is fetched.
                checkpointer.save(step, state, batches.get_state(), config)
            if stopping:
                checkpointer.wait()
                raise Preempted(step, signal.Signals(stop_signal.agreed).name)
            if step < last_step:
                batch = parallel.global_batch_from_local(next(batches), mesh)  # overlaps the running step
            if step % config.train.log_every == 0 or step == last_step:
                scalars = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
                throughput.mark(step, time.perf_counter())
                scalars["train/pairs_per_sec"] = throughput.pairs_per_sec
                scalars.update(batches.skip_metrics())  # data/skipped/<reason>, counted since the run began
                scalars["train/mfu"] = metrics.mfu(
                    flops_per_step, throughput.step_seconds, device_kind, config.model.dtype, mesh.size
                )
                writer.write(step, scalars)
                logging.info(metrics.format_console(step, config.train.steps, {**scalars, "eta": throughput.eta()}))
            if step % config.eval.every == 0 and step < config.train.steps:
                evaluate_and_log(evaluator, state, eval_subset, writer, step, subset_name)
                throughput.mark(step, time.perf_counter())  # evaluation time is not training time
        if pending is not None:
            check_nonfinite(*pending, config, checkpointer)
        if step < config.train.steps:
            return None
        if not config.eval.final:
            logging.info("config.eval.final=False: no full evaluation; python -m vlp_jax.main --mode=eval "
                         "--workdir=%s --config=... runs it on the last checkpoint", workdir)
            return {}
        checkpoint = str(checkpointer.directory / str(step))
        return evaluate_fully(evaluator, state, eval_data, writer, step, workdir, checkpoint, scope)
    finally:
        batches.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | None, checkpoint: str | None = None
) -> dict[str, float]:
    """`--mode=eval`: the full evaluation (`evaluate_fully`) of a checkpoint; returns the retrieval metrics.

    The checkpoint: `checkpoint` (a run's workdir, meaning its latest checkpoint, or one of its
    checkpoints/<step> directories), by default the latest in `workdir`. The report and picture go to
    <workdir>/eval/; without `workdir`, to the evaluated run's.
    """
    run_dir, step = find_checkpoint(checkpoint, "--checkpoint") if checkpoint else find_checkpoint(workdir, "--workdir")
    workdir = absolute(workdir) if workdir else run_dir
    config = methods.prepare(config, run_dir, None)
    tokenizer = pipeline.load_tokenizer(config, run_dir, pipeline.open_sources(config, "train", run_dir)[0])
    scope = eval_scope(config)
    eval_data = pipeline.load_eval(config, run_dir, tokenizer, limit=scope.limit)
    run = setup(config, {"image": eval_data.images[:1], "text": eval_data.captions[:1]})
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    state, _ = checkpointer.restore(step, abstract_like(run.state, run.shardings), config)
    checkpointer.close()
    evaluator = make_evaluator(run.method, run.shardings.params, run.mesh, config, tokenizer)
    writer = metrics.MetricWriter(str(workdir), enabled=jax.process_index() == 0)
    try:
        checkpoint_dir = str(checkpointer.directory / str(step))
        return evaluate_fully(evaluator, state, eval_data, writer, step, workdir, checkpoint_dir, scope)
    finally:
        writer.close()


def check_nonfinite(step: int, streak, config, checkpointer: Checkpointer) -> None:
    """Stops the run after `config.train.max_nonfinite_steps` skipped steps in a row."""
    streak = int(streak)
    if streak >= config.train.max_nonfinite_steps:
        raise FloatingPointError(
            f"step {step}: the loss or gradients were non-finite for {streak} steps in a row "
            f"(config.train.max_nonfinite_steps={config.train.max_nonfinite_steps}); those updates were skipped. "
            f"Last good checkpoint: {checkpointer.directory / str(checkpointer.latest_step())}. Lower "
            "--config.train.learning_rate, check the data, or use float32 (--config.model.dtype=float32)."
        )
