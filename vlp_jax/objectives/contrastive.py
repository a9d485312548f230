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
- Unimodal knowledge sharing (COOKIE): the two sides are a student's and a teacher's embeddings of one modality.

`chunk` > 0 (config.train.contrastive_chunk) never builds the [b, B] logits: the gathered keys are scored in
column blocks of `chunk` with an online log-sum-exp (`blocked_log_sum_exp`), each block rematerialised in the
backward pass, so the loss's memory is O(b × chunk) — the same loss and gradients. `ring` (config.train.
contrastive_ring) never gathers the keys either: each replica's block of keys travels round the ring of replicas
(`ppermute`, Inf-CL's and SigLIP's ring), so the collectives are R − 1 neighbour sends of b × d instead of one
all-gather of B × d, which XLA can overlap with the scoring of the block at hand. Its backward pass (ours, Inf-CL's
scheme: parallel.ring_over_batch) sends the blocks round again, each with its gradient, instead of keeping every
hop's block: a replica holds O(b × d) of keys in both passes.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.parallel import BATCH_AXES, gather_batch, replica_index, ring_over_batch

# A finite "minus infinity" for masked logits: softmax gives exactly 0 there and 0 × it stays 0 in the KL.
MASKED_LOGIT = -1e9


def _masked(logits: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, logits, MASKED_LOGIT)


def blocked_log_sum_exp(queries: jax.Array, keys: jax.Array, scale: jax.Array, chunk: int
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logsumexp_j scale·q_i·k_j [b], max_j [b], argmax_j [b]) over the rows of `keys` [B, d], `chunk` columns at
    a time: a scan with a running maximum and sum (flash-attention style), each block under jax.checkpoint so the
    backward pass recomputes its [b, chunk] logits instead of keeping them. Columns past B (padding to whole
    blocks) are masked."""
    total, dim = keys.shape
    blocks = -(-total // chunk)
    padded = jnp.pad(keys, ((0, blocks * chunk - total), (0, 0))).reshape(blocks, chunk, dim)
    valid = (jnp.arange(blocks * chunk) < total).reshape(blocks, chunk)

    @jax.checkpoint
    def block(key_block, valid_block):
        logits = jnp.where(valid_block[None, :], scale * queries @ key_block.T, MASKED_LOGIT)  # [b, chunk]
        top = jax.lax.stop_gradient(logits.max(axis=-1))
        return top, jnp.exp(logits - top[:, None]).sum(axis=-1), jnp.argmax(logits, axis=-1)

    def step(carry, inputs):
        running_max, running_sum, best, best_index = carry
        key_block, valid_block, offset = inputs
        top, total_exp, arg = block(key_block, valid_block)
        new_max = jnp.maximum(running_max, top)
        running_sum = running_sum * jnp.exp(running_max - new_max) + total_exp * jnp.exp(top - new_max)
        better = top > best
        return (new_max, running_sum, jnp.where(better, top, best), jnp.where(better, offset + arg, best_index)), None

    zero = jax.lax.stop_gradient(queries[:, 0]) * 0  # [b], varying over the replicas like the carry (shard_map)
    start = (zero + 2 * MASKED_LOGIT, zero, zero + 2 * MASKED_LOGIT, zero.astype(jnp.int32))
    (running_max, running_sum, best, best_index), _ = jax.lax.scan(
        step, start, (padded, valid, jnp.arange(blocks, dtype=jnp.int32) * chunk))
    return running_max + jnp.log(running_sum), best, best_index


def ring_log_sum_exp(queries: jax.Array, keys: jax.Array, scale: jax.Array, chunk: int
                     ) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: (logsumexp [b], argmax [b] in gathered-batch columns) of `queries` against every
    replica's `keys` [b, d] without gathering them: the blocks visit each replica round the ring
    (parallel.ring_over_batch) and each is scored `chunk` columns at a time (0: the whole block) by
    blocked_log_sum_exp, the per-block results merged online. Ties go to the first column, as in the gathered
    order."""

    def visit(carry, block, first_row, queries, scale):
        lse, best, best_index = carry
        block_lse, block_best, block_index = blocked_log_sum_exp(queries, block, scale, chunk or block.shape[0])
        block_index = first_row + block_index
        better = (block_best > best) | ((block_best == best) & (block_index < best_index))
        return (jnp.logaddexp(lse, block_lse), jnp.where(better, block_best, best),
                jnp.where(better, block_index, best_index))

    zero = jax.lax.stop_gradient(queries[:, 0]) * 0  # [b], varying over the replicas like the carry
    start = (zero + 2 * MASKED_LOGIT, zero + 2 * MASKED_LOGIT, zero.astype(jnp.int32))
    lse, _, best_index = ring_over_batch(keys, visit, start, queries, scale)
    return lse, best_index


def _pair_weights(weights: jax.Array | None, local: int) -> tuple[jax.Array, jax.Array]:
    """(this replica's pair weights [b], their sum over all replicas): ones when `weights` is None."""
    w = jnp.ones((local,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    return w, jnp.maximum(jax.lax.psum(w.sum(), BATCH_AXES), 1e-6)


def _accuracy(predicted: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of the global batch's rows whose best column is their positive."""
    return jax.lax.psum(jnp.sum(predicted == labels), BATCH_AXES) / jax.lax.psum(labels.shape[0], BATCH_AXES)


def _local_chunked(queries_a, queries_b, keys_a, keys_b, weights, logit_scale, *, chunk, ring):
    """_local_contrastive without queue or KL, never materialising the [b, B] logits (blocked_log_sum_exp), the
    keys all-gathered or, with `ring`, passed round the replicas (ring_log_sum_exp)."""
    local = queries_a.shape[0]
    labels = replica_index() * local + jnp.arange(local)
    queries_a, queries_b = queries_a.astype(jnp.float32), queries_b.astype(jnp.float32)
    keys_a, keys_b = keys_a.astype(jnp.float32), keys_b.astype(jnp.float32)
    if ring:
        lse_ab, best_ab = ring_log_sum_exp(queries_a, keys_b, logit_scale, chunk)
        lse_ba, _ = ring_log_sum_exp(queries_b, keys_a, logit_scale, chunk)
    else:
        lse_ab, _, best_ab = blocked_log_sum_exp(queries_a, gather_batch(keys_b), logit_scale, chunk)
        lse_ba, _, _ = blocked_log_sum_exp(queries_b, gather_batch(keys_a), logit_scale, chunk)
    positive_ab = logit_scale * jnp.sum(queries_a * keys_b, axis=-1)  # the positives are this replica's own rows
    positive_ba = logit_scale * jnp.sum(queries_b * keys_a, axis=-1)
    per_row = (lse_ab - positive_ab) + (lse_ba - positive_ba)
    w, total_weight = _pair_weights(weights, local)
    loss = jax.lax.psum((w * per_row).sum(), BATCH_AXES) / (2 * total_weight)
    return {"loss": loss, "accuracy": _accuracy(best_ab, labels)}


def _local_contrastive(queries_a, queries_b, keys_a, keys_b, queue, weights, logit_scale, *, in_batch_negatives,
                       with_kl, kl_symmetric):
    """Runs per replica inside shard_map; returns global (weighted) means, identical on every replica."""
    local = queries_a.shape[0]
    gathered_b = gather_batch(keys_b)  # [B, d]: every replica's b keys score our a queries
    gathered_a = gather_batch(keys_a)  # [B, d]
    labels = replica_index() * local + jnp.arange(local)  # our positives' columns in the gathered batch
    logits_ab = logit_scale * queries_a.astype(jnp.float32) @ gathered_b.astype(jnp.float32).T  # [b, B]
    logits_ba = logit_scale * queries_b.astype(jnp.float32) @ gathered_a.astype(jnp.float32).T  # [b, B]
    if not in_batch_negatives:  # MoCo as in BriVL's paper: only the positive from the batch, negatives from the queue
        own = jnp.arange(gathered_b.shape[0])[None, :] == labels[:, None]
        logits_ab, logits_ba = _masked(logits_ab, own), _masked(logits_ba, own)
    if queue is not None:
        valid = queue["valid"][None, :]
        logits_ab = jnp.concatenate(
            [logits_ab, _masked(logit_scale * queries_a.astype(jnp.float32) @ queue["b"].T, valid)], axis=1)
        logits_ba = jnp.concatenate(
            [logits_ba, _masked(logit_scale * queries_b.astype(jnp.float32) @ queue["a"].T, valid)], axis=1)
    log_p_ab = jax.nn.log_softmax(logits_ab, axis=-1)
    log_p_ba = jax.nn.log_softmax(logits_ba, axis=-1)
    rows = jnp.arange(local)
    per_row = -(log_p_ab[rows, labels] + log_p_ba[rows, labels])  # [b]
    w, total_weight = _pair_weights(weights, local)
    loss = jax.lax.psum((w * per_row).sum(), BATCH_AXES) / (2 * total_weight)
    out = {"loss": loss, "accuracy": _accuracy(jnp.argmax(logits_ab, axis=-1), labels)}
    if with_kl:
        kl = kl_alignment(log_p_ab, log_p_ba, kl_symmetric)  # [b]
        out["kl"] = jax.lax.psum((w * kl).sum(), BATCH_AXES) / total_weight
    return out


def kl_alignment(log_p_ab: jax.Array, log_p_ba: jax.Array, symmetric: bool = True) -> jax.Array:
    """COTS's task-level alignment per row: KL(p_ab ‖ p_ba), symmetrised when `symmetric`. [b, C] -> [b].

    Column k of both distributions must be the same pair (pair k's b key for a→b, its a key for b→a)."""
    p_ab, p_ba = jnp.exp(log_p_ab), jnp.exp(log_p_ba)
    kl = jnp.sum(p_ab * (log_p_ab - log_p_ba), axis=-1)
    if symmetric:
        kl = 0.5 * (kl + jnp.sum(p_ba * (log_p_ba - log_p_ab), axis=-1))
    return kl


def contrastive_loss(
    queries_a: jax.Array,
    queries_b: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    *,
    keys_a: jax.Array | None = None,
    keys_b: jax.Array | None = None,
    queue: dict[str, jax.Array] | None = None,
    weights: jax.Array | None = None,
    in_batch_negatives: bool = True,
    with_kl: bool = False,
    kl_symmetric: bool = True,
    chunk: int = 0,
    ring: bool = False,
) -> dict[str, jax.Array]:
    """Symmetric InfoNCE of unit-norm queries of two sides a and b [B, d] (sharded over the batch axes): a's
    queries against b's keys and b's against a's; row i of both sides is pair i. Cross-modal: a = image,
    b = text; the same function contrasts image↔image or text↔text (a student against a teacher).

    Keys default to the other side's queries (CLIP). `queue` = {"a": [K, d], "b": [K, d], "valid": bool [K]} adds
    K paired negatives (invalid slots masked out). `weights` [B] weights each pair's terms (0 removes a pair from
    the loss; it stays a negative for the others). Returns {"loss", "accuracy" (a→b top-1)} and, with `with_kl`,
    "kl": the (weighted mean) kl_alignment of the a→b and b→a distributions. `chunk` > 0: the blocked path (see
    the module docstring; in-batch negatives only, without queue or KL). `ring`: the blocked path with the keys
    passed round the replicas instead of all-gathered (ring_log_sum_exp; `chunk` 0 scores a visiting block whole).
    """
    rows, whole = PartitionSpec(BATCH_AXES), PartitionSpec()
    keys_a = queries_a if keys_a is None else keys_a
    keys_b = queries_b if keys_b is None else keys_b
    if chunk > 0 or ring:
        if queue is not None or with_kl or not in_batch_negatives:
            flag = f"contrastive_chunk={chunk}" if chunk > 0 else "contrastive_ring=True"
            raise ValueError(f"config.train.{flag}: the blocked loss covers in-batch negatives only, not a queue, "
                             "the KL alignment or queue-only negatives; leave it off for this method")
        return jax.shard_map(
            functools.partial(_local_chunked, chunk=chunk, ring=ring), mesh=mesh,
            in_specs=(rows, rows, rows, rows, None if weights is None else rows, whole),
            out_specs={"loss": whole, "accuracy": whole},
        )(queries_a, queries_b, keys_a, keys_b, weights, logit_scale)
    local = functools.partial(_local_contrastive, in_batch_negatives=in_batch_negatives, with_kl=with_kl,
                              kl_symmetric=kl_symmetric)
    out_specs = {"loss": whole, "accuracy": whole, **({"kl": whole} if with_kl else {})}
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, rows, None if queue is None else whole, None if weights is None else rows, whole),
        out_specs=out_specs,
    )(queries_a, queries_b, keys_a, keys_b, queue, weights, logit_scale)


def contrastive_blocks(train: ml_collections.ConfigDict) -> dict:
    """The blocking arguments (`chunk`, `ring`) of contrastive_loss / sigmoid_loss from `config.train`."""
    return {"chunk": train.get("contrastive_chunk", 0), "ring": train.get("contrastive_ring", False)}


def clip_loss(
    image: jax.Array, text: jax.Array, logit_scale: jax.Array, mesh: Mesh, chunk: int = 0, ring: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch. image, text: unit-norm [B, d] sharded over the batch axes."""
    out = contrastive_loss(image, text, logit_scale, mesh, chunk=chunk, ring=ring)
    return out["loss"], {"contrastive_loss": out["loss"], "i2t_accuracy": out["accuracy"]}
