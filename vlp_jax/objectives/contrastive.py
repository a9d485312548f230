"""Symmetric InfoNCE with negatives all-gathered across data-parallel replicas (a "local loss").

Each replica holds b = B / R rows of the global batch B. It scores its own b image queries against all B text keys
and its b text queries against all B image keys, so memory is O(b × B) rather than O(B × B). The positives of
local row i sit at global column `replica * b + i`. Gradients reach the other replicas' embeddings because the
backward of `all_gather` is a reduce-scatter, so the result equals the single-device loss on the whole batch.

One function serves every method:
- CLIP: the keys are the online embeddings themselves (gradient flows through the gather).
- BriVL / COTS: the keys are momentum-encoder embeddings (no gradient), optionally followed by a paired queue of
  older keys (`queue`: image/text keys enqueued together, so column B + k is one pair in both directions),
  per-pair weights (the adaptive momentum filter), and the KL alignment of the i2t and t2i distributions.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.parallel import BATCH_AXES, gather_batch, replica_index

# A finite "minus infinity" for masked logits: softmax gives exactly 0 there and 0 × it stays 0 in the KL.
MASKED_LOGIT = -1e9


def _masked(logits: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, logits, MASKED_LOGIT)


def _local_contrastive(image_q, text_q, image_k, text_k, queue, weights, logit_scale, *, in_batch_negatives,
                       with_kl, kl_symmetric):
    """Runs per replica inside shard_map; returns global (weighted) means, identical on every replica."""
    local = image_q.shape[0]
    keys_text = gather_batch(text_k)  # [B, d]: every replica's text keys score our image queries
    keys_image = gather_batch(image_k)  # [B, d]
    labels = replica_index() * local + jnp.arange(local)  # our positives' columns in the gathered batch
    logits_i2t = logit_scale * image_q.astype(jnp.float32) @ keys_text.astype(jnp.float32).T  # [b, B]
    logits_t2i = logit_scale * text_q.astype(jnp.float32) @ keys_image.astype(jnp.float32).T  # [b, B]
    if not in_batch_negatives:  # MoCo as in BriVL's paper: only the positive from the batch, negatives from the queue
        own = jnp.arange(keys_text.shape[0])[None, :] == labels[:, None]
        logits_i2t, logits_t2i = _masked(logits_i2t, own), _masked(logits_t2i, own)
    if queue is not None:
        valid = queue["valid"][None, :]
        logits_i2t = jnp.concatenate(
            [logits_i2t, _masked(logit_scale * image_q.astype(jnp.float32) @ queue["text"].T, valid)], axis=1)
        logits_t2i = jnp.concatenate(
            [logits_t2i, _masked(logit_scale * text_q.astype(jnp.float32) @ queue["image"].T, valid)], axis=1)
    log_p_i2t = jax.nn.log_softmax(logits_i2t, axis=-1)
    log_p_t2i = jax.nn.log_softmax(logits_t2i, axis=-1)
    rows = jnp.arange(local)
    per_row = -(log_p_i2t[rows, labels] + log_p_t2i[rows, labels])  # [b]
    w = jnp.ones((local,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    total_weight = jnp.maximum(jax.lax.psum(w.sum(), BATCH_AXES), 1e-6)
    loss = jax.lax.psum((w * per_row).sum(), BATCH_AXES) / (2 * total_weight)
    correct = jnp.sum(jnp.argmax(logits_i2t, axis=-1) == labels)
    accuracy = jax.lax.psum(correct, BATCH_AXES) / jax.lax.psum(local, BATCH_AXES)
    out = {"loss": loss, "accuracy": accuracy}
    if with_kl:
        # Column k of both distributions is the same pair (the text key of pair k for i2t, its image key for t2i).
        p_i2t, p_t2i = jnp.exp(log_p_i2t), jnp.exp(log_p_t2i)
        kl = jnp.sum(p_i2t * (log_p_i2t - log_p_t2i), axis=-1)  # KL(p_i2t ‖ p_t2i) per row
        if kl_symmetric:
            kl = 0.5 * (kl + jnp.sum(p_t2i * (log_p_t2i - log_p_i2t), axis=-1))
        out["kl"] = jax.lax.psum((w * kl).sum(), BATCH_AXES) / total_weight
    return out


def contrastive_loss(
    image: jax.Array,
    text: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    *,
    image_keys: jax.Array | None = None,
    text_keys: jax.Array | None = None,
    queue: dict[str, jax.Array] | None = None,
    weights: jax.Array | None = None,
    in_batch_negatives: bool = True,
    with_kl: bool = False,
    kl_symmetric: bool = True,
) -> dict[str, jax.Array]:
    """Symmetric InfoNCE of unit-norm queries `image`, `text` [B, d] (sharded over the batch axes) against keys.

    Keys default to the queries of the other modality (CLIP). `queue` = {"image": [K, d], "text": [K, d],
    "valid": bool [K]} adds K paired negatives (invalid slots masked out). `weights` [B] weights each pair's terms
    (0 removes a pair from the loss; it stays a negative for the others). Returns {"loss", "accuracy"} and, with
    `with_kl`, "kl": the (weighted mean) KL(p_i2t ‖ p_t2i), symmetrised if `kl_symmetric`.
    """
    rows, whole = PartitionSpec(BATCH_AXES), PartitionSpec()
    image_keys = image if image_keys is None else image_keys
    text_keys = text if text_keys is None else text_keys
    local = functools.partial(_local_contrastive, in_batch_negatives=in_batch_negatives, with_kl=with_kl,
                              kl_symmetric=kl_symmetric)
    out_specs = {"loss": whole, "accuracy": whole, **({"kl": whole} if with_kl else {})}
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, rows, None if queue is None else whole, None if weights is None else rows, whole),
        out_specs=out_specs,
    )(image, text, image_keys, text_keys, queue, weights, logit_scale)


def clip_loss(
    image: jax.Array, text: jax.Array, logit_scale: jax.Array, mesh: Mesh
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch. image, text: unit-norm [B, d] sharded over the batch axes."""
    out = contrastive_loss(image, text, logit_scale, mesh)
    return out["loss"], {"contrastive_loss": out["loss"], "i2t_accuracy": out["accuracy"]}
