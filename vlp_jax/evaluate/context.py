"""The evaluator API: what every evaluator receives (`EvalPass`), returns (`Result`) and is built from
(`EvalContext`, its name and options). The registry and the runner are in run.py.

An evaluator is built once per run and called on each evaluation: every `every` steps on the eval subset during
training (0: only at the end; -1: every `config.eval.every` steps), and at the end of training or in
`--mode=eval` on the (capped) eval set. One evaluation's evaluators share the set's embeddings (`EvalPass`), so
the towers run once whatever the number of evaluators.
"""

import dataclasses
import functools
import time

import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlp_jax.data.dataset import PairDataset
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.evaluate.embeddings import Encoders
from vlp_jax.evaluate.retrieval import Scorer, scorer_from_config
from vlp_jax.evaluate.scope import EvalScope, eval_batch_size

EVERY_EVAL_STEP = -1  # an evaluator's `every`: run whenever the loop scores the subset (config.eval.every)


@dataclasses.dataclass
class EvalContext:
    """What a run's evaluators share: the method and where its parameters live, the config, the tokenizer and
    the scope of the full evaluation; the encoders and the retrieval scorer compile once, on first use."""

    method: object
    param_shardings: object
    mesh: Mesh
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer | None
    scope: EvalScope

    @functools.cached_property
    def batch_size(self) -> int:
        return eval_batch_size(self.config, self.mesh)

    @functools.cached_property
    def encoders(self) -> Encoders:
        return Encoders(self.method, self.param_shardings, self.mesh, self.batch_size)

    @functools.cached_property
    def scorer(self) -> Scorer:
        return scorer_from_config(self.config.eval, self.mesh)


@dataclasses.dataclass
class EvalPass:
    """One evaluation: parameters (and the method's non-gradient state) on one named set. `final` is the end of
    training or --mode=eval (the whole suite), else the subset scored during training."""

    context: EvalContext
    params: object
    extra: object
    dataset: PairDataset
    name: str
    final: bool
    _embedded: tuple | None = None

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(images [N, d], captions [M, d]) of the set, embedded once per pass; `seconds()` times them."""
        if self._embedded is None:
            encoders, params = self.context.encoders, self.params
            encoders.images(params, self.dataset.images[:1])  # compile before the timing starts
            encoders.texts(params, self.dataset.captions[:1])
            started = time.perf_counter()
            images = encoders.images(params, self.dataset.images)
            middle = time.perf_counter()
            texts = encoders.texts(params, self.dataset.captions)
            self._embedded = (images, texts, middle - started, time.perf_counter() - middle)
        return self._embedded[:2]

    def seconds(self) -> tuple[float, float]:
        """Seconds the image and the text embeddings took (after compilation)."""
        self.embeddings()
        return self._embedded[2:]


@dataclasses.dataclass
class Result:
    """What an evaluator returns: flat scalars (full keys, e.g. eval/<set>/i2t_r1) for metrics.jsonl and
    TensorBoard; a nested report merged into the JSON report; summary lines for the log; optionally a picture."""

    scalars: dict[str, float]
    report: dict
    summary: list[str] = dataclasses.field(default_factory=list)
    picture: np.ndarray | None = None  # uint8 [H, W, 3]
    picture_tag: str = ""  # TensorBoard tag eval/<set>/<picture_tag>; default: the evaluator's name


class Evaluator:
    """Base of the registered evaluators. `headline`: its set metrics are what train_and_evaluate returns."""

    headline = False

    def __init__(self, context: EvalContext, name: str, options: ml_collections.ConfigDict):
        self.context = context
        self.name = name
        self.options = options
        self.every = options.get("every", 0)

    def __call__(self, evaluation: EvalPass) -> Result:
        raise NotImplementedError


def set_result(evaluation: EvalPass, section: str, metrics: dict[str, float], key_prefix: str = "") -> Result:
    """A per-set result: report sets/<set>/<section>, scalars eval/<set>/<key_prefix><metric>."""
    scalars = {f"eval/{evaluation.name}/{key_prefix}{key}": value for key, value in metrics.items()}
    return Result(scalars, {"sets": {evaluation.name: {section: metrics}}})
