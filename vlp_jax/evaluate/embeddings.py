"""A method's encoders, compiled once, embedding whole arrays batch by batch with the batch sharded over the mesh.

Each JAX process feeds its own contiguous slice of every global batch; the encoder's replicated output gathers
the batch's embeddings onto every process, so each process ends with all of them (float32 [n, d] on the host),
ready for `retrieval.Scorer`, which expects every process to hold the full arrays.
"""

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from vlp_jax import parallel

MODALITIES = ("image", "text")


def make_encoder(method, param_shardings, mesh: Mesh, modality: str) -> Callable:
    """A jitted (params, inputs [b, ...]) -> unit-norm embeddings [b, d] for one modality."""
    return jax.jit(
        lambda params, inputs: method.encode(params, {modality: inputs})[modality],
        in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def embed_all(encode: Callable, params, inputs: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
    """Runs `encode` over `inputs` (the same full array on every process) in global batches of `batch_size`.

    The last batch is padded and the padding dropped. Batches run one at a time: the encoder's output gather is
    a collective, and several collectives in flight at once can deadlock XLA's CPU runtime. Returns float32 [n, d].
    """
    if len(inputs) == 0:
        raise ValueError("nothing to embed: the eval set is empty")
    local = batch_size // jax.process_count()
    first = jax.process_index() * local  # this process's rows of each global batch
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        batch = parallel.global_batch_from_local({"x": padded[first : first + local]}, mesh)["x"]
        outputs.append(np.asarray(encode(params, batch))[: len(chunk)])
    return np.concatenate(outputs).astype(np.float32)


class Encoders:
    """A method's image and text encoders, jitted once and reused at every evaluation."""

    def __init__(self, method, param_shardings, mesh: Mesh, batch_size: int):
        parallel.check_batch_size(batch_size, mesh, flag="config.eval.batch_size")
        if batch_size % jax.process_count():
            raise ValueError(
                f"config.eval.batch_size={batch_size} is not divisible by the {jax.process_count()} processes"
            )
        self.mesh = mesh
        self.batch_size = batch_size
        self._encode = {modality: make_encoder(method, param_shardings, mesh, modality) for modality in MODALITIES}

    def images(self, params, images: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] -> float32 [n, d] unit-norm image embeddings."""
        return self._embed("image", params, images)

    def texts(self, params, tokens: np.ndarray) -> np.ndarray:
        """int32 [n, L] token ids -> float32 [n, d] unit-norm text embeddings."""
        return self._embed("text", params, tokens)

    def compiled_versions(self) -> int:
        """How many shapes the encoders were compiled for: stays at one per modality across evaluations."""
        return sum(encode._cache_size() for encode in self._encode.values())

    def _embed(self, modality: str, params, inputs: np.ndarray) -> np.ndarray:
        with parallel.mesh_context(self.mesh):
            return embed_all(self._encode[modality], params, inputs, self.batch_size, self.mesh)
