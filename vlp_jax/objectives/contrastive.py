"""Symmetric InfoNCE with negatives all-gathered across data-parallel replicas (a "local loss").

Each replica holds b = B / R rows of the global batch B. It scores its own b images against all B texts and its
b texts against all B images, so memory is O(b × B) rather than O(B × B). The positives of local row i sit at
global column `replica * b + i`. Gradients reach the other replicas' embeddings because the backward of
`all_gather` is a reduce-scatter, so the result equals the single-device loss on the whole batch.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.parallel import BATCH_AXES, gather_batch, replica_index


def _local_infonce(image: jax.Array, text: jax.Array, logit_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs per replica inside shard_map; returns the global mean loss and i2t top-1 accuracy."""
    local = image.shape[0]
    all_text = gather_batch(text)  # [B, d]; every replica's texts are negatives for our images
    all_image = gather_batch(image)  # [B, d]
    labels = replica_index() * local + jnp.arange(local)  # our positives' columns in the gathered batch
    logits_i2t = logit_scale * image @ all_text.T  # [b, B]
    logits_t2i = logit_scale * text @ all_image.T  # [b, B]
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits_i2t, labels)
    per_row += optax.softmax_cross_entropy_with_integer_labels(logits_t2i, labels)
    correct = jnp.sum(jnp.argmax(logits_i2t, axis=-1) == labels)
    # Sum over every replica's rows, then divide by the global batch: the mean over all B pairs.
    global_batch = jax.lax.psum(local, BATCH_AXES)
    loss = jax.lax.psum(per_row.sum(), BATCH_AXES) / (2 * global_batch)
    accuracy = jax.lax.psum(correct, BATCH_AXES) / global_batch
    return loss, accuracy


def clip_loss(
    image: jax.Array, text: jax.Array, logit_scale: jax.Array, mesh: Mesh
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch. image, text: unit-norm [B, d] sharded over the batch axes."""
    rows = PartitionSpec(BATCH_AXES)
    loss, accuracy = jax.shard_map(
        _local_infonce,
        mesh=mesh,
        in_specs=(rows, rows, PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
    )(image, text, logit_scale)
    return loss, {"contrastive_loss": loss, "i2t_accuracy": accuracy}
