"""Evaluation of a run: the evaluator registry, the runner the train loop calls, the report, and `--mode=eval`.

Evaluators are declared by name in `config.eval.evaluators` (type, cadence, options) and added by the method
(`Method.evaluators`); `register(type, cls)` adds a type (a subclass of context.Evaluator). The train loop
knows only `Evaluations.periodic` (the subset, every few steps) and `Evaluations.full` (the end of training and
--mode=eval): it has no evaluator-type branches.

The full evaluation reads at most `scope.limit` eval images (scope.eval_scope), names the set `scope.name`, and
writes every figure as a scalar (metrics.jsonl, TensorBoard), the pictures to TensorBoard, and the report to
<workdir>/eval/step_<N>.json (+ step_<N>.png for the first picture).
"""

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from vlp_jax import checkpoint, methods, metrics, stages, step
from vlp_jax.data import pipeline
from vlp_jax.evaluate.context import EVERY_EVAL_STEP, EvalContext, EvalPass, Evaluator, Result
from vlp_jax.evaluate.downstream import DownstreamEvaluator
from vlp_jax.evaluate.evaluators import (
    EfficiencyEvaluator,
    PictureEvaluator,
    RetrievalEvaluator,
    TwinsEvaluator,
    UnimodalEvaluator,
    ZeroShotEvaluator,
)
from vlp_jax.evaluate.reconstruction import ReconstructionEvaluator
from vlp_jax.evaluate.rerank import RerankEvaluator
from vlp_jax.evaluate.scope import EvalScope, capped, eval_scope, records_available

EVAL_DIR = "eval"  # <workdir>/eval/step_<N>.json and .png: the full evaluation's report and picture

REGISTRY: dict[str, type[Evaluator]] = {
    "retrieval": RetrievalEvaluator,
    "unimodal": UnimodalEvaluator,
    "zeroshot": ZeroShotEvaluator,
    "efficiency": EfficiencyEvaluator,
    "picture": PictureEvaluator,
    "reconstruction": ReconstructionEvaluator,
    "rerank": RerankEvaluator,
    "downstream": DownstreamEvaluator,
    "twins": TwinsEvaluator,
}


def register(type_name: str, evaluator_class: type[Evaluator]) -> None:
    """Makes evaluator entries of `type=type_name` build `evaluator_class`."""
    if not issubclass(evaluator_class, Evaluator):
        raise TypeError(f"{evaluator_class.__name__} must subclass vlp_jax.evaluate.context.Evaluator")
    REGISTRY[type_name] = evaluator_class


def declared(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """`config.eval.evaluators` plus the method's own (Method.evaluators); the config's entry wins a name. An
    unknown type is an error naming the entry (checked before anything is trained)."""
    added = methods.get(config.method.name).evaluators(config)
    found = {name: ml_collections.ConfigDict(options) for name, options in added.items()}
    found.update(dict(config.eval.evaluators.items()))
    for name, options in found.items():
        if options.get("type") not in REGISTRY:
            raise ValueError(
                f"config.eval.evaluators.{name}.type={options.get('type')!r} is unknown; known types: "
                f"{', '.join(sorted(REGISTRY))}"
            )
    return found


class Evaluations:
    """A run's evaluators, built once (each compiles what it needs on first use)."""

    def __init__(self, context: EvalContext):
        self.context = context
        self.evaluators: list[Evaluator] = []
        for name, options in declared(context.config).items():
            self.evaluators.append(REGISTRY[options.type](context, name, options))
        self.evaluators.sort(key=lambda evaluator: not evaluator.headline)  # the headline table is logged first

    def _every(self, evaluator: Evaluator) -> int:
        return self.context.config.eval.every if evaluator.every == EVERY_EVAL_STEP else evaluator.every

    def periodic(self, state, dataset, name: str, step: int, writer: metrics.MetricWriter) -> None:
        """The evaluators due at `step` (their `every` divides it) on the eval subset, logged."""
        due = [e for e in self.evaluators if self._every(e) > 0 and step % self._every(e) == 0]
        if not due:
            return
        evaluation = EvalPass(self.context, state.params, state.extra, dataset, name, final=False)
        results = [evaluator(evaluation) for evaluator in due]
        writer.write(step, {key: value for result in results for key, value in result.scalars.items()})
        lines = [line for result in results for line in result.summary]
        logging.info("step %d evaluation on %d held-out images:\n%s", step, len(dataset), "\n".join(lines))

    def full(self, state, eval_data, writer, step: int, workdir: epath.Path, checkpoint_dir: str,
             scope: EvalScope) -> dict[str, float]:
        """Every evaluator on the (capped) eval set; returns the headline metrics of the set (retrieval's, or the
        reconstruction's for the tokenizer)."""
        name, available = scope.name, records_available(eval_data)
        eval_data = capped(eval_data, scope)
        evaluation = EvalPass(self.context, state.params, state.extra, eval_data, name, final=True)
        results = [(evaluator, evaluator(evaluation)) for evaluator in self.evaluators]
        report = {"checkpoint": checkpoint_dir, "eval_set": {"name": name, "images": len(eval_data),
                                                             "available": available}}
        for _, result in results:
            _merge(report, result.report)
        writer.write(step, {key: value for _, result in results for key, value in result.scalars.items()})
        pictures = [(f"eval/{name}/{r.picture_tag or e.name}", r.picture) for e, r in results if r.picture is not None]
        for tag, picture in pictures:
            writer.write_image(step, tag, picture)
        if jax.process_index() == 0:
            path = save_report(workdir / EVAL_DIR, step, report, pictures[0][1] if pictures else None)
            summary = "\n".join(line for _, result in results for line in result.summary)
            logging.info("step %d full evaluation (report %s):\n%s", step, path, summary)
        return _headline(results, name)


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)  # new dicts: an evaluator's own report is never changed
        else:
            into[key] = value


def _headline(results: list[tuple[Evaluator, Result]], name: str) -> dict[str, float]:
    headline = {}
    for evaluator, result in results:
        if evaluator.headline:
            for section in result.report.get("sets", {}).get(name, {}).values():
                headline.update(section)
    return headline


def save_report(directory: epath.PathLike, step: int, report: dict, picture: np.ndarray | None = None) -> epath.Path:
    """Writes <directory>/step_<step>.json and, given a picture, step_<step>.png; returns the JSON's path."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = {"step": step, **report}
    if picture is not None:
        picture_path = directory / f"step_{step}.png"
        with picture_path.open("wb") as file:
            Image.fromarray(picture).save(file, format="PNG")
        report["picture"] = picture_path.name
    report_path = directory / f"step_{step}.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report_path


# What --mode=eval takes from the given config; everything else comes from the evaluated run's saved config.
EVAL_KEYS = ("eval", "mesh", "data.loader", "data.eval_sources", "data.group_label", "train.device_memory_bytes")


def saved_with_eval_keys(saved: dict, given: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's saved config (JSON) with `given`'s EVAL_KEYS; other differences are logged as ignored, so an
    evaluation needs none of the training overrides repeated."""
    config = ml_collections.ConfigDict(saved)
    for key in EVAL_KEYS:
        value = stages.get_key(given, key)
        stages.set_key(config, key, value.copy_and_resolve_references() if hasattr(value, "to_dict") else value)
    ignored = checkpoint.config_differences(saved, checkpoint.config_as_json(given))  # eval keys never listed
    if ignored:
        logging.info("--mode=eval uses the run's saved config; the given config differs in these keys, which only "
                     "training reads (ignored):\n  %s", "\n  ".join(ignored))
    return config


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | None, checkpoint_path: str | None = None
) -> dict[str, float]:
    """`--mode=eval`: the full evaluation of a checkpoint; returns the headline metrics.

    The checkpoint: `checkpoint_path` (a run's workdir, meaning its latest checkpoint, or one of its
    checkpoints/<step> directories), by default the latest in `workdir`. The run's saved config is used; only
    the evaluation keys (EVAL_KEYS) of `config` apply. The report and picture go to
    <workdir>/eval/; without `workdir`, to the evaluated run's.
    """
    if checkpoint_path:
        run_dir, at = checkpoint.find_checkpoint(checkpoint_path, "--checkpoint")
    else:
        run_dir, at = checkpoint.find_checkpoint(workdir, "--workdir")
    workdir = checkpoint.absolute(workdir) if workdir else run_dir
    checkpointer = checkpoint.Checkpointer(run_dir, config.checkpoint)
    config = saved_with_eval_keys(checkpointer.saved_config(at), config)
    config = stages.prepare(config, run_dir, None)
    tokenizer = pipeline.load_tokenizer(config, run_dir, pipeline.open_sources(config, "train", run_dir)[0])
    scope = eval_scope(config)
    eval_data = pipeline.load_eval(config, run_dir, tokenizer, limit=scope.limit)
    run = step.setup(config)
    state, _ = checkpointer.restore(at, checkpoint.abstract_like(run.state, run.shardings), config)
    checkpointer.close()
    evaluations = Evaluations(EvalContext(run.method, run.shardings.params, run.mesh, config, tokenizer, scope))
    writer = metrics.MetricWriter(str(workdir), enabled=jax.process_index() == 0)
    try:
        checkpoint_dir = str(checkpointer.directory / str(at))
        return evaluations.full(state, eval_data, writer, at, workdir, checkpoint_dir, scope)
    finally:
        writer.close()
