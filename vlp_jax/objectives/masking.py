"""Masks for masked language modelling (BERT-style) and masked vision modelling (BEiT-style blockwise).

Both run inside the jitted step from a PRNG key, so the masks are part of the deterministic run.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax.data.tokenizer import EOS_ID, PAD_ID


def mlm_mask(
    rng: jax.Array, tokens: jax.Array, cfg: ml_collections.ConfigDict, vocab_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BERT's recipe over real word tokens (not PAD/BOS/EOS): a `cfg.ratio` fraction is selected for prediction;
    of those `cfg.mask_fraction` get the learned mask embedding, `cfg.random_fraction` a random word id, the rest
    stay as they are.

    Returns (input tokens int32 [b, l], mask-embedding positions bool [b, l], prediction positions bool [b, l]).
    At least one position per caption is predicted (the selected one with the highest draw) so no row is empty.
    """
    select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
    words = (tokens != PAD_ID) & (tokens != EOS_ID) & (jnp.arange(tokens.shape[1]) > 0)  # position 0 is BOS
    score = jnp.where(words, jax.random.uniform(select_rng, tokens.shape), -1.0)
    best = jnp.argmax(score, axis=1)
    predict = (score > 1.0 - cfg.ratio) | ((jnp.arange(tokens.shape[1]) == best[:, None]) & words)
    kind = jax.random.uniform(kind_rng, tokens.shape)
    masked = predict & (kind < cfg.mask_fraction)
    randomised = predict & (kind >= cfg.mask_fraction) & (kind < cfg.mask_fraction + cfg.random_fraction)
    random_ids = jax.random.randint(token_rng, tokens.shape, EOS_ID + 1, vocab_size)
    inputs = jnp.where(randomised, random_ids, tokens).astype(jnp.int32)
    return inputs, masked, predict


def block_mask(rng: jax.Array, batch: int, grid: int, cfg: ml_collections.ConfigDict) -> jax.Array:
    """BEiT-style blockwise masking of a grid × grid patch layout: bool [batch, grid²], row-major.

    Each example draws `cfg.attempts` random rectangles (area between `cfg.min_block_fraction` of the grid and the
    remaining budget, log-uniform aspect ratio in [1/cfg.max_aspect, cfg.max_aspect]) and keeps each one that does
    not push the masked count above `cfg.ratio` × grid². Rejected blocks leave the mask below target, never above.
    """
    total = grid * grid
    target = max(1, round(cfg.ratio * total))
    min_area = max(1.0, cfg.min_block_fraction * total)
    log_aspect = math.log(cfg.max_aspect)
    rows = jnp.arange(grid)

    def one(key):
        def attempt(i, mask):
            area_key, aspect_key, top_key, left_key = jax.random.split(jax.random.fold_in(key, i), 4)
            budget = jnp.maximum(target - mask.sum(), min_area)
            area = jax.random.uniform(area_key, minval=min_area, maxval=budget)
            aspect = jnp.exp(jax.random.uniform(aspect_key, minval=-log_aspect, maxval=log_aspect))
            height = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, grid).astype(jnp.int32)
            width = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, grid).astype(jnp.int32)
            top = jax.random.randint(top_key, (), 0, grid - height + 1)
            left = jax.random.randint(left_key, (), 0, grid - width + 1)
            block = ((rows >= top) & (rows < top + height))[:, None] & ((rows >= left) & (rows < left + width))[None]
            grown = mask | block
            return jnp.where(grown.sum() <= target, grown, mask)

        return jax.lax.fori_loop(0, cfg.attempts, attempt, jnp.zeros((grid, grid), jnp.bool_)).reshape(total)

    return jax.vmap(one)(jax.random.split(rng, batch))
