"""Embeds a whole dataset with a method's `encode`, sharded over the mesh, and scores retrieval on it."""

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from vlp_jax import parallel
from vlp_jax.data.pipeline import PairDataset
from vlp_jax.evaluate.retrieval import retrieval_metrics


def make_encoder(method, param_shardings, mesh: Mesh, modality: str) -> Callable:
    """A jitted (params, inputs [b, ...]) -> unit-norm embeddings [b, d] for one modality."""
    return jax.jit(
        lambda params, inputs: method.encode(params, {modality: inputs})[modality],
        in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def embed_all(encode: Callable, params, inputs: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
    """Runs `encode` over `inputs` in fixed-size batches (the last padded, the padding dropped): float32 [n, d]."""
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        batch = parallel.global_batch_from_local({"x": padded}, mesh)["x"]
        outputs.append(np.asarray(encode(params, batch))[: len(chunk)])
    return np.concatenate(outputs).astype(np.float32)


class RetrievalEvaluator:
    """Image↔text retrieval on one dataset; encoders are compiled once and reused at every eval step."""

    def __init__(self, method, param_shardings, mesh: Mesh, batch_size: int):
        parallel.check_batch_size(batch_size, mesh, flag="config.eval.batch_size")
        self.mesh = mesh
        self.batch_size = batch_size
        self.encode_image = make_encoder(method, param_shardings, mesh, "image")
        self.encode_text = make_encoder(method, param_shardings, mesh, "text")

    def __call__(self, params, dataset: PairDataset) -> dict[str, float]:
        with parallel.mesh_context(self.mesh):
            images = embed_all(self.encode_image, params, dataset.images, self.batch_size, self.mesh)
            texts = embed_all(self.encode_text, params, dataset.captions, self.batch_size, self.mesh)
        return retrieval_metrics(images, texts, dataset.caption_image)
