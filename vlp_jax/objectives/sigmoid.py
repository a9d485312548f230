"""SigLIP's pairwise sigmoid loss with negatives all-gathered across replicas, optionally in column blocks.

Every (image i, text j) pair of the global batch B is one binary problem: label +1 when j = i, -1 otherwise, logit
t·⟨x_i, y_j⟩ + b with a learnable scale t and bias b (SigLIP, Zhai et al. 2023). The loss is
-Σ_ij log σ(label_ij · logit_ij) / B. There is no softmax, so no normaliser couples the columns: the sum splits
over any blocks. Each replica scores its b images against all B gathered texts (memory b × B); the gradient reaches
the other replicas' texts through the gather's backward (a reduce-scatter), so the sharded loss equals the
single-device one. SigLIP's paper passes text blocks around a ring instead of gathering them (big_vision's
`chunked` loss is a TODO there); `chunk` > 0 gives the same bounded memory without the ring: the gathered texts are
scored `chunk` columns at a time, each block rematerialised in the backward pass, so the live logits are b × chunk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.parallel import BATCH_AXES, gather_batch, replica_index


def _block_terms(images, texts, columns, labels, scale, bias):
    """(Σ log σ(±logit) over the block, the block's best column per image and its logit) for texts [c, d] at
    global `columns` [c] (-1 = padding)."""
    logits = scale * images @ texts.T + bias  # [b, c]
    positive = columns[None, :] == labels[:, None]
    sign = jnp.where(positive, 1.0, -1.0)
    valid = (columns >= 0)[None, :]
    total = jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(sign * logits), 0.0))
    masked = jnp.where(valid, logits, -jnp.inf)
    return total, jnp.argmax(masked, axis=-1), jnp.max(masked, axis=-1)


def _local_sigmoid(images, texts, scale, bias, *, chunk):
    local = images.shape[0]
    images = images.astype(jnp.float32)
    gathered = gather_batch(texts).astype(jnp.float32)  # [B, d]
    total_rows = gathered.shape[0]
    labels = replica_index() * local + jnp.arange(local)
    if chunk <= 0:
        total, best, _ = _block_terms(images, gathered, jnp.arange(total_rows), labels, scale, bias)
    else:
        blocks = -(-total_rows // chunk)
        padded = jnp.pad(gathered, ((0, blocks * chunk - total_rows), (0, 0))).reshape(blocks, chunk, -1)
        columns = jnp.arange(blocks * chunk)
        columns = jnp.where(columns < total_rows, columns, -1).reshape(blocks, chunk)
        block = jax.checkpoint(functools.partial(_block_terms, images, labels=labels, scale=scale, bias=bias))

        def step(carry, inputs):
            total, best, best_logit = carry
            block_total, arg, top = block(*inputs)
            better = top > best_logit
            offset = inputs[1][0]
            return (total + block_total, jnp.where(better, offset + arg, best), jnp.maximum(best_logit, top)), None

        zero = jax.lax.stop_gradient(images[:, 0]) * 0  # [b], varying over the replicas like the carry
        start = (jnp.sum(zero), zero.astype(jnp.int32), zero - jnp.inf)
        (total, best, _), _ = jax.lax.scan(step, start, (padded, columns))
    loss = -jax.lax.psum(total, BATCH_AXES) / total_rows
    accuracy = jax.lax.psum(jnp.sum(best == labels), BATCH_AXES) / total_rows
    return {"loss": loss, "accuracy": accuracy}


def sigmoid_loss(images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array, mesh: Mesh,
                 chunk: int = 0) -> dict[str, jax.Array]:
    """SigLIP's loss of unit-norm image and text embeddings [B, d] (sharded over the batch axes, row i of both is
    pair i) with logit scale `scale` and bias `bias`; {"loss", "accuracy" (image→text top-1)}."""
    rows, whole = PartitionSpec(BATCH_AXES), PartitionSpec()
    return jax.shard_map(functools.partial(_local_sigmoid, chunk=chunk), mesh=mesh,
                         in_specs=(rows, rows, whole, whole), out_specs={"loss": whole, "accuracy": whole},
                         )(images, texts, scale, bias)
