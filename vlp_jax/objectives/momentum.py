"""Momentum (EMA) encoders, the paired key queue, and the adaptive momentum filter (AMF).

All three live in the state's `extra` and are updated inside the jitted train step by the method's loss:

- EMA parameters θ' ← m·θ' + (1 − m)·θ, sharded like the parameters (they are initialised from the same boxed
  tree, so they carry the same logical axes). The online θ enters through stop_gradient: keys never train it.
- The paired queue (BriVL [code]; optional, our default is the all-gathered global batch of momentum keys): image
  and text keys enqueued together at one pointer, so slot k is one pair in both directions, which is what the COTS
  KL alignment needs. Slots start invalid and are masked out of the negatives until filled; pairs the AMF drops
  are enqueued as invalid, i.e. kept out of the dictionary. The queue is sharded over the batch axes (its rows
  are logical 'batch'); writes happen on the global array under jit, so its contents do not depend on the mesh.
- AMF [ours, from the COTS paper's one-line description]: s_i = v'_i · t'_i of the momentum encoders; an EMA of the
  batch mean μ and standard deviation σ of s; after `warmup_steps`, pairs with s_i < μ − α·σ get weight 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

PyTree = object


def ema_update(ema: PyTree, params: PyTree, momentum: float | jax.Array) -> PyTree:
    """θ' ← m·θ' + (1 − m)·θ with no gradient into θ."""
    params = jax.lax.stop_gradient(params)
    return jax.tree.map(lambda e, p: (momentum * e + (1.0 - momentum) * p).astype(e.dtype), ema, params)


def check_queue_size(queue_size: int, global_batch: int) -> None:
    """The pointer advances by the global batch, so the queue must hold a whole number of batches."""
    if queue_size < 0 or (queue_size and queue_size % global_batch):
        raise ValueError(
            f"config.method.queue_size={queue_size} must be 0 (no queue: the all-gathered global batch is the "
            f"dictionary) or a positive multiple of config.train.batch_size={global_batch}, e.g. "
            f"--config.method.queue_size={max(1, queue_size // global_batch) * global_batch}"
        )


def init_queue(size: int, dim: int) -> dict[str, jax.Array]:
    """An empty paired queue; rows carry the logical 'batch' axis so they are sharded over the batch axes."""

    def rows(shape, dtype):
        return nn.LogicallyPartitioned(jnp.zeros(shape, dtype), names=("batch",) + (None,) * (len(shape) - 1))

    return {
        "image": rows((size, dim), jnp.float32),
        "text": rows((size, dim), jnp.float32),
        "valid": rows((size,), jnp.bool_),
        "pointer": jnp.zeros((), jnp.int32),
    }


def enqueue(queue: dict, image_keys: jax.Array, text_keys: jax.Array, keep: jax.Array) -> dict:
    """Writes the global batch's keys at the pointer (FIFO); pairs with keep=False are written as invalid."""
    pointer = queue["pointer"]
    batch = image_keys.shape[0]
    write = jax.lax.dynamic_update_slice
    return {
        "image": write(queue["image"], jax.lax.stop_gradient(image_keys).astype(jnp.float32), (pointer, 0)),
        "text": write(queue["text"], jax.lax.stop_gradient(text_keys).astype(jnp.float32), (pointer, 0)),
        "valid": write(queue["valid"], keep.astype(jnp.bool_), (pointer,)),
        "pointer": (pointer + batch) % queue["image"].shape[0],
    }


def as_pairs(queue: dict) -> dict[str, jax.Array]:
    """The queue as contrastive_loss's paired negatives: side a = image keys, side b = text keys."""
    return {"a": queue["image"], "b": queue["text"], "valid": queue["valid"]}


def init_filter() -> dict[str, jax.Array]:
    """AMF running statistics of the momentum positive-pair similarity."""
    zero = jnp.zeros((), jnp.float32)
    return {"mean": zero, "std": zero, "count": jnp.zeros((), jnp.int32)}


def adaptive_filter(
    stats: dict, similarity: jax.Array, step: jax.Array, cfg: ml_collections.ConfigDict
) -> tuple[jax.Array, dict, dict[str, jax.Array]]:
    """Returns (weights [B] in {0, 1}, new stats, metrics) for positive-pair similarities s [B].

    The threshold uses the statistics from before this batch (so a batch cannot hide its own outliers); the
    statistics then absorb this batch, the first batch directly. `cfg`: enabled, alpha, decay, warmup_steps.
    """
    similarity = jax.lax.stop_gradient(similarity.astype(jnp.float32))
    threshold = stats["mean"] - cfg.alpha * stats["std"]
    active = jnp.asarray(cfg.enabled) & (step >= cfg.warmup_steps) & (stats["count"] > 0)
    keep = jnp.where(active, similarity >= threshold, True)
    batch_mean, batch_std = similarity.mean(), similarity.std()
    first = stats["count"] == 0
    decay = cfg.decay
    new_stats = {
        "mean": jnp.where(first, batch_mean, decay * stats["mean"] + (1 - decay) * batch_mean),
        "std": jnp.where(first, batch_std, decay * stats["std"] + (1 - decay) * batch_std),
        "count": stats["count"] + 1,
    }
    metrics = {
        "amf/filtered_fraction": 1.0 - keep.mean(),
        "amf/threshold": jnp.where(active, threshold, jnp.nan),
        "amf/similarity_mean": new_stats["mean"],
        "amf/similarity_std": new_stats["std"],
    }
    return keep.astype(jnp.float32), new_stats, metrics


def filter_quality(keep: jax.Array, noisy: jax.Array) -> dict[str, jax.Array]:
    """Precision and recall of the dropped pairs against ground-truth noise flags (evaluation only: the flags
    never change the loss)."""
    dropped = keep < 0.5
    noisy = noisy.astype(jnp.bool_)
    hits = jnp.sum(dropped & noisy)
    return {
        "amf/precision": jnp.where(dropped.any(), hits / jnp.maximum(dropped.sum(), 1), jnp.nan),
        "amf/recall": jnp.where(noisy.any(), hits / jnp.maximum(noisy.sum(), 1), jnp.nan),
        "amf/noise_fraction": noisy.mean(),
    }
