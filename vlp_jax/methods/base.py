"""The Method protocol: the only things the generic train loop knows about a pre-training method.

All functions are pure over pytrees; `extra` carries non-gradient state (EMA params, queues, statistics).
"""

from typing import Any, Protocol

import jax

PyTree = Any
Batch = dict[str, jax.Array]  # "image": uint8 [B, H, W, 3], "text": int32 [B, L]; methods may need more keys


class Method(Protocol):
    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        """Returns (params, extra); leaves may carry logical partitioning metadata (boxed)."""

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], PyTree]]:
        """Returns (scalar loss, (metrics, new_extra)); runs inside the jitted train step."""

    def encode(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """L2-normalised embeddings for evaluation: {"image": [b, d]} and/or {"text": [b, d]}."""


# Optional: a method whose evaluation is not image-text retrieval (e.g. the VQ tokenizer) defines
#     make_evaluator(param_shardings, mesh, batch_size) -> evaluator(params, extra, eval_dataset) -> dict[str, float]
# and the train loop uses it instead of the retrieval suite (`train.make_evaluator`); the suite's extras (zero-shot,
# unimodal, efficiency, the retrieval picture) apply to the retrieval suite only.
