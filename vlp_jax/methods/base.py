"""The Method protocol: the only things the generic loop (step.py, train.py, evaluate/run.py) knows about a method.

A method is built from the run config, the mesh and the other runs' weights it declared (`pretrained`), and is
pure over pytrees: `extra` carries non-gradient state (EMA params, queues, statistics). Every hook is declared
here with its default, so a method overrides what it needs and the loop never probes with getattr:

- `features(config)`: the per-example features the data pipeline builds (data/examples.py FEATURES);
- `example_batch(config)`: the arrays of one example (shape and dtype), used to initialise parameters, by
  `--mode=eval` and by the benchmark; nothing is taken from the data to learn shapes;
- `pretrained(config)`: other runs' weights the method needs (a tokenizer, a teacher), read by the loop with the
  one partial reader (checkpoint.load_params) and handed to the constructor;
- `evaluators(config)`: evaluators the method adds to those of `config.eval.evaluators` (evaluate/run.py);
- `init`, `loss`, `encode`: the model itself.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vlp_jax import flops

PyTree = Any
Batch = dict[str, jax.Array]  # "image": uint8 [B, H, W, 3], "text": int32 [B, L], and what `features` declares
IMAGE_TEXT = ("image", "text")  # the features of a two-tower method


@dataclasses.dataclass(frozen=True)
class Feature:
    """One array of an example: its shape without the batch axis, dtype, and for integer ids their range
    [0, values), from which the benchmark draws random inputs (0: the dtype's own range)."""

    shape: tuple[int, ...]
    dtype: str
    values: int = 0


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Weights of another run a method needs: the run directory is the value of the config key `config_key`
    (dotted, e.g. "method.mvm.tokenizer"); `items` are the TrainState subtrees read ("params", "extra");
    `method`, when given, is the config.method.name the run must have."""

    config_key: str
    items: tuple[str, ...] = ("params",)
    method: str = ""


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """What the loop hands a method for each `Pretrained` it declared: the run's saved config and its trees
    by item ({"params": ..., "extra": ...}, host arrays)."""

    config: ml_collections.ConfigDict
    trees: dict[str, PyTree]


def image_text_example(config: ml_collections.ConfigDict) -> dict[str, Feature]:
    """The example of a two-tower method: an image of the model's size and a caption of its token length."""
    image, text = config.model.image, config.model.text
    return {
        "image": Feature((image.image_size, image.image_size, 3), "uint8"),
        "text": Feature((text.max_len,), "int32", text.vocab_size),
    }


def split_rows(x: jax.Array, parts: int) -> jax.Array:
    """[B, ...] -> [K, B/K, ...] with part k = rows k, K + k, 2K + k, ...: interleaved, so each replica's share of
    the batch rows stays on it (the batch axis is sharded in contiguous blocks)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 0, 1)


def merge_rows(x: jax.Array) -> jax.Array:
    """`split_rows`' inverse: [K, B/K, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class Method:
    """Base of every method; subclasses implement `init`, `loss` and `encode` and override hooks as needed."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, pretrained: dict[str, LoadedRun]):
        self.config = config
        self.mesh = mesh
        self.loaded = pretrained

    # -- declarations (class-level: the loop asks them before it builds the method) -----------------------------
    @classmethod
    def features(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Names of the per-example features the data pipeline builds for this method."""
        del config
        return IMAGE_TEXT

    @classmethod
    def example_batch(cls, config: ml_collections.ConfigDict) -> dict[str, Feature]:
        """The arrays of one training example (the batch's keys, without the batch axis)."""
        return image_text_example(config)

    # -- exact gradient accumulation (config.train.microbatches) -------------------------------------------------
    # A method whose loss is a function of per-example outputs (CLIP, SigLIP, BriVL, COTS, COOKIE, CMAL) implements
    # `embed` and `embedding_loss` (and `embed_constants` for per-example outputs without gradient, such as momentum
    # keys), and per-example terms (COTS's MLM and MVM, CMAL's AMC) as `example_inputs` + `example_terms`; the
    # default `loss` combines them and `loss_and_grads` computes the global batch's exact gradient one micro-batch
    # of activations at a time. A term that pairs an example with another one (CMAL's hard negatives) belongs in
    # `embedding_loss`, on outputs as fine as it needs (token and region features): its gradient then reaches the
    # other example's micro-batch.
    def embed(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Per-example outputs [b, ...] of the trainable forward pass whose gradient `loss_and_grads` accumulates."""
        raise NotImplementedError

    def embed_constants(self, params: PyTree, extra: PyTree, batch: Batch, step: jax.Array) -> dict[str, jax.Array]:
        """Per-example outputs [b, ...] the loss needs but never differentiates (e.g. momentum keys); none here."""
        del params, extra, batch, step
        return {}

    def embedding_loss(self, params: PyTree, embeddings: dict[str, jax.Array], constants: dict[str, jax.Array],
                       extra: PyTree, rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[dict, PyTree]]:
        """(loss, (metrics, new extra)) of the whole global batch from `embed`'s and `embed_constants`' outputs (and
        params such as a temperature); the non-gradient state (EMA, queue, statistics) changes here, once a step.
        `rng` is the step's key (the one `example_inputs` gets too: split it where both draw)."""
        raise NotImplementedError

    def example_inputs(self, extra: PyTree, batch: Batch, constants: dict[str, jax.Array], rng: jax.Array,
                       step: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """What `example_terms` needs, drawn or computed once for the whole global batch without gradient:
        per-example arrays [B, ...] (masks, pair weights, targets) and global scalars (the terms' normalisers, so a
        term never divides by the size of the micro-batch it sees). None here."""
        del extra, batch, constants, rng, step
        return {}, {}

    def example_terms(self, params: PyTree, extra: PyTree, batch: Batch, embeddings: dict[str, jax.Array],
                      inputs: dict[str, jax.Array], totals: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """(loss, metrics) of per-example terms for the rows of `batch`, with their `embed` outputs and `inputs`
        rows. Additive: the terms of a partition of the batch sum to the whole batch's (what makes them accumulate
        exactly), so normalise by `totals`. None here."""
        del params, extra, batch, embeddings, inputs, totals
        return jnp.float32(0.0), {}

    @classmethod
    def accumulates(cls) -> bool:
        """Whether `loss` is `embedding_loss` of `embed` plus `example_terms`, so micro-batches give its exact
        gradient."""
        return cls.embed is not Method.embed and cls.embedding_loss is not Method.embedding_loss

    def loss_and_grads(self, params, extra, batch, rng, step, microbatches: int = 1):
        """((loss, (metrics, extra)), grads) of `loss`. With `microbatches` K > 1 (methods that `accumulates`): the
        batch is split into K interleaved micro-batches (each replica keeps its own rows); all are embedded without
        keeping activations, the loss and its gradient w.r.t. the embeddings are taken over the whole batch, then
        each micro-batch is run again and back-propagated with its slice of that gradient plus its per-example
        terms (GradCache / open_clip's accum-freq). The gradient is the whole batch's, exactly; one micro-batch's
        activations are live at a time; the non-gradient state changes once."""
        if microbatches <= 1:
            return jax.value_and_grad(self.loss, has_aux=True)(params, extra, batch, rng, step)
        if not self.accumulates():
            raise ValueError(f"config.train.microbatches={microbatches}: method {self.config.method.name!r} has no "
                             "embed/embedding_loss split (CLIP, SigLIP, BriVL, COTS, COOKIE and CMAL have one); "
                             "set it to 1")
        size = jax.tree.leaves(batch)[0].shape[0]
        if size % microbatches:
            raise ValueError(f"config.train.microbatches={microbatches} does not divide the global batch {size}")

        split = functools.partial(split_rows, parts=microbatches)
        parts = jax.tree.map(split, batch)
        frozen = jax.lax.stop_gradient(params)
        embedded, constants = jax.lax.map(
            lambda part: (self.embed(frozen, part), self.embed_constants(frozen, extra, part, step)), parts)
        embeddings, constants = jax.tree.map(merge_rows, embedded), jax.tree.map(merge_rows, constants)
        (loss, (metrics, new_extra)), (direct, cotangents) = jax.value_and_grad(
            lambda p, e: self.embedding_loss(p, e, constants, extra, rng, step), argnums=(0, 1), has_aux=True
        )(params, embeddings)
        inputs, totals = self.example_inputs(extra, batch, constants, rng, step)

        def accumulate(total, xs):
            part, part_inputs, cotangent = xs

            def forward(p):
                part_embeddings = self.embed(p, part)
                terms, term_metrics = self.example_terms(p, extra, part, part_embeddings, part_inputs, totals)
                return (part_embeddings, jnp.asarray(terms, jnp.float32)), term_metrics

            (_, terms), pull, term_metrics = jax.vjp(forward, params, has_aux=True)
            grads = pull((cotangent, jnp.ones_like(terms)))[0]
            return jax.tree.map(jnp.add, total, grads), (terms, term_metrics)

        grads, (terms, term_metrics) = jax.lax.scan(
            accumulate, direct, (parts, jax.tree.map(split, inputs), jax.tree.map(split, cotangents)))
        metrics = {**metrics, **jax.tree.map(lambda x: x.sum(0), term_metrics)}
        return (loss + terms.sum(), (metrics, new_extra)), grads

    @classmethod
    def encode_flops(cls, config: ml_collections.ConfigDict) -> dict[str, float]:
        """Forward FLOPs of `encode` per image and per text (the efficiency evaluator's FLOP rate): the towers and
        their projections; a method that adds layers on top (COOKIE's shared head) adds theirs."""
        return flops.tower_encode_flops(config.model)

    @classmethod
    def resolve_config(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The run config completed before anything is built (after the stages ran): e.g. fine-tuning takes its
        towers' shapes and tokenizer from `config.init_from`. Runs at every start of the run, so a resumed run
        resolves to the same config; saved with the checkpoints (what --mode=eval reads)."""
        return config

    @classmethod
    def pretrained(cls, config: ml_collections.ConfigDict) -> dict[str, Pretrained]:
        """Other runs' weights by name; the constructor receives them loaded, as `pretrained[name]`."""
        del config
        return {}

    @classmethod
    def evaluators(cls, config: ml_collections.ConfigDict) -> dict[str, dict]:
        """Evaluators this method adds to `config.eval.evaluators`: name -> {"type": registered type, ...}."""
        del config
        return {}

    # -- the model -----------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        """Returns (params, extra); leaves may carry logical partitioning metadata (boxed)."""
        raise NotImplementedError

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], PyTree]]:
        """Returns (scalar loss, (metrics, new_extra)); runs inside the jitted train step. By default a method with
        the embed/embedding_loss split's loss on the whole batch at once (`loss_and_grads` splits it instead)."""
        if not self.accumulates():
            raise NotImplementedError(f"{type(self).__name__} implements neither loss nor embed/embedding_loss")
        embeddings = self.embed(params, batch)
        constants = self.embed_constants(params, extra, batch, step)
        loss, (metrics, new_extra) = self.embedding_loss(params, embeddings, constants, extra, rng, step)
        inputs, totals = self.example_inputs(extra, batch, constants, rng, step)
        terms, term_metrics = self.example_terms(params, extra, batch, embeddings, inputs, totals)
        return loss + terms, ({**metrics, **term_metrics}, new_extra)

    def encode(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """L2-normalised embeddings for evaluation: {"image": [b, d]} and/or {"text": [b, d]}."""
        raise NotImplementedError
