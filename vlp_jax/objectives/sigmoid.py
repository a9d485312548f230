"""SigLIP's pairwise sigmoid loss with negatives all-gathered across replicas, optionally in column blocks.

Every (image i, text j) pair of the global batch B is one binary problem: label +1 when j = i, -1 otherwise, logit
t·⟨x_i, y_j⟩ + b with a learnable scale t and bias b (SigLIP, Zhai et al. 2023). The loss is
-Σ_ij log σ(label_ij · logit_ij) / B. There is no softmax, so no normaliser couples the columns: the sum splits
over any blocks. Each replica scores its b images against all B gathered texts (memory b × B); the gradient reaches
the other replicas' texts through the gather's backward (a reduce-scatter), so the sharded loss equals the
single-device one. SigLIP's paper passes text blocks around a ring instead of gathering them (big_vision's
`chunked` loss is a TODO there): `ring` does that (parallel.ring_over_batch, one `ppermute` hop per replica).
`chunk` > 0 bounds the live logits either way: the texts at hand are scored `chunk` columns at a time, each block
rematerialised in the backward pass, so the live logits are b × chunk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.parallel import BATCH_AXES, gather_batch, replica_index, ring_over_batch


def _block_terms(images, texts, columns, labels, scale, bias):
    """(Σ log σ(±logit) over the block, the index in the block of each image's best text and its logit) for texts
    [c, d] at global `columns` [c] (-1 = padding)."""
    logits = scale * images @ texts.T + bias  # [b, c]
    positive = columns[None, :] == labels[:, None]
    sign = jnp.where(positive, 1.0, -1.0)
    valid = (columns >= 0)[None, :]
    total = jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(sign * logits), 0.0))
    masked = jnp.where(valid, logits, -jnp.inf)
    return total, jnp.argmax(masked, axis=-1), jnp.max(masked, axis=-1)


def _score_texts(images, texts, first_column, labels, scale, bias, chunk):
    """(Σ log σ(±logit), best column per image, its logit) of `images` against `texts` [n, d] at global columns
    first_column + [0, n), `chunk` columns at a time (each block rematerialised in the backward pass), or all at
    once when `chunk` is 0."""
    count = texts.shape[0]
    if chunk <= 0:
        total, arg, top = _block_terms(images, texts, first_column + jnp.arange(count), labels, scale, bias)
        return total, first_column + arg, top
    blocks = -(-count // chunk)
    padded = jnp.pad(texts, ((0, blocks * chunk - count), (0, 0))).reshape(blocks, chunk, -1)
    columns = jnp.arange(blocks * chunk)
    columns = jnp.where(columns < count, first_column + columns, -1).reshape(blocks, chunk)
    block = jax.checkpoint(functools.partial(_block_terms, images, labels=labels, scale=scale, bias=bias))

    def step(carry, inputs):
        total, best, best_logit = carry
        block_total, arg, top = block(*inputs)
        better = top > best_logit
        offset = inputs[1][0]
        return (total + block_total, jnp.where(better, offset + arg, best), jnp.maximum(best_logit, top)), None

    (total, best, best_logit), _ = jax.lax.scan(step, _start(images), (padded, columns))
    return total, best, best_logit


def _start(images):
    """The empty (total, best column, best logit), varying over the replicas like the carries (shard_map)."""
    zero = jax.lax.stop_gradient(images[:, 0]) * 0  # [b]
    return jnp.sum(zero), zero.astype(jnp.int32), zero - jnp.inf


def _local_sigmoid(images, texts, scale, bias, *, chunk, ring):
    local = images.shape[0]
    images = images.astype(jnp.float32)
    total_rows = local * jax.lax.axis_size(BATCH_AXES)
    labels = replica_index() * local + jnp.arange(local)
    if ring:  # the texts travel round the replicas instead of being gathered (parallel.ring_over_batch)

        def visit(carry, block, first_row, images, labels, scale, bias):
            total, best, best_logit = carry
            # (a whole visiting block is still one rematerialised block: its logits are not kept for every hop)
            block_total, block_best, top = _score_texts(images, block.astype(jnp.float32), first_row, labels, scale,
                                                        bias, chunk or block.shape[0])
            better = (top > best_logit) | ((top == best_logit) & (block_best < best))  # ties: the first column
            return total + block_total, jnp.where(better, block_best, best), jnp.maximum(best_logit, top)

        total, best, _ = ring_over_batch(texts, visit, _start(images), images, labels, scale, bias)
    else:
        total, best, _ = _score_texts(images, gather_batch(texts).astype(jnp.float32), 0, labels, scale, bias, chunk)
    loss = -jax.lax.psum(total, BATCH_AXES) / total_rows
    accuracy = jax.lax.psum(jnp.sum(best == labels), BATCH_AXES) / total_rows
    return {"loss": loss, "accuracy": accuracy}


def sigmoid_loss(images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array, mesh: Mesh,
                 chunk: int = 0, ring: bool = False) -> dict[str, jax.Array]:
    """SigLIP's loss of unit-norm image and text embeddings [B, d] (sharded over the batch axes, row i of both is
    pair i) with logit scale `scale` and bias `bias`; {"loss", "accuracy" (image→text top-1)}. `ring`: the texts
    pass round the replicas instead of being gathered; `chunk` bounds the columns scored at once either way."""
    rows, whole = PartitionSpec(BATCH_AXES), PartitionSpec()
    return jax.shard_map(functools.partial(_local_sigmoid, chunk=chunk, ring=ring), mesh=mesh,
                         in_specs=(rows, rows, whole, whole), out_specs={"loss": whole, "accuracy": whole},
                         )(images, texts, scale, bias)
