"""Momentum pieces: EMA, the paired queue, the KL alignment and the adaptive momentum filter."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.unit.test_contrastive import unit_rows
from vlp_jax import parallel
from vlp_jax.objectives import momentum
from vlp_jax.objectives.contrastive import contrastive_loss
from vlp_jax.objectives.masking import block_mask, mlm_mask


def mesh_of(shape):
    return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))))


def reference(image, text, image_k, text_k, queue, weights, scale, in_batch=True):
    """Plain NumPy-style momentum InfoNCE + symmetric KL on one device, for comparison."""
    n = len(image)
    logits_i2t = scale * image @ text_k.T
    logits_t2i = scale * text @ image_k.T
    if not in_batch:
        logits_i2t = jnp.where(jnp.eye(n, dtype=bool), logits_i2t, -1e9)
        logits_t2i = jnp.where(jnp.eye(n, dtype=bool), logits_t2i, -1e9)
    if queue is not None:
        logits_i2t = jnp.concatenate([logits_i2t, jnp.where(queue["valid"], scale * image @ queue["text"].T, -1e9)], 1)
        logits_t2i = jnp.concatenate([logits_t2i, jnp.where(queue["valid"], scale * text @ queue["image"].T, -1e9)], 1)
    lp_i2t, lp_t2i = jax.nn.log_softmax(logits_i2t), jax.nn.log_softmax(logits_t2i)
    rows = jnp.arange(n)
    ce = -(lp_i2t[rows, rows] + lp_t2i[rows, rows])
    kl = 0.5 * (jnp.sum(jnp.exp(lp_i2t) * (lp_i2t - lp_t2i), 1) + jnp.sum(jnp.exp(lp_t2i) * (lp_t2i - lp_i2t), 1))
    return (weights * ce).sum() / (2 * weights.sum()), (weights * kl).sum() / weights.sum()


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_momentum_loss_with_queue_weights_and_kl_equals_single_device(shape):
    rng = np.random.default_rng(1)
    image, text, image_k, text_k = (unit_rows(rng, (32, 8)) for _ in range(4))
    queue = {"image": unit_rows(rng, (16, 8)), "text": unit_rows(rng, (16, 8)),
             "valid": np.arange(16) < 11}  # five slots not filled yet
    weights = (rng.random(32) > 0.25).astype(np.float32)
    scale = jnp.float32(1 / 0.07)
    mesh = mesh_of(shape)

    def sharded(i, t):
        out = contrastive_loss(i, t, scale, mesh, keys_a=image_k, keys_b=text_k, queue=momentum.as_pairs(queue),
                               weights=weights, with_kl=True)
        return out["loss"] + out["kl"], out

    def single(i, t):
        loss, kl = reference(i, t, image_k, text_k, queue, weights, scale)
        return loss + kl, (loss, kl)

    (total, out), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(image, text)
    (ref_total, (ref_loss, ref_kl)), ref_grads = jax.value_and_grad(single, argnums=(0, 1), has_aux=True)(image, text)
    np.testing.assert_allclose(out["loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(out["kl"], ref_kl, rtol=1e-4, atol=1e-7)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_moco_form_uses_only_the_positive_from_the_batch():
    rng = np.random.default_rng(2)
    image, text, image_k, text_k = (unit_rows(rng, (16, 8)) for _ in range(4))
    queue = {"image": unit_rows(rng, (16, 8)), "text": unit_rows(rng, (16, 8)), "valid": np.ones(16, bool)}
    ones = np.ones(16, np.float32)
    out = jax.jit(lambda: contrastive_loss(image, text, 10.0, mesh_of((8, 1, 1)), keys_a=image_k,
                                           keys_b=text_k, queue=momentum.as_pairs(queue), weights=ones,
                                           in_batch_negatives=False))()
    want, _ = reference(image, text, image_k, text_k, queue, ones, 10.0, in_batch=False)
    np.testing.assert_allclose(out["loss"], want, rtol=1e-5)


def test_kl_is_zero_when_the_distributions_coincide_and_the_supports_are_aligned():
    rng = np.random.default_rng(3)
    embeddings, keys = unit_rows(rng, (16, 8)), unit_rows(rng, (16, 8))
    mesh = mesh_of((8, 1, 1))
    # Enqueue two batches of keys with identical image and text sides: every slot k holds one pair.
    queue = jax.tree.map(lambda x: getattr(x, "value", x), momentum.init_queue(32, 8),
                         is_leaf=lambda x: hasattr(x, "value"))
    for batch in (unit_rows(rng, (16, 8)), unit_rows(rng, (16, 8))):
        queue = momentum.enqueue(queue, batch, batch, jnp.ones(16, bool))
    view = {k: queue[k] for k in ("image", "text", "valid")}

    def kl(q):
        return float(jax.jit(lambda: contrastive_loss(embeddings, embeddings, 10.0, mesh, keys_a=keys,
                                                      keys_b=keys, queue=momentum.as_pairs(q), with_kl=True))()["kl"])

    assert kl(view) == pytest.approx(0.0, abs=1e-6)
    misaligned = {**view, "text": jnp.roll(view["text"], 1, axis=0)}  # slot k of text no longer pair k
    assert kl(misaligned) > 1e-3


def test_queue_is_fifo_with_one_pointer_and_drops_filtered_pairs():
    queue = jax.tree.map(lambda x: getattr(x, "value", x), momentum.init_queue(6, 2),
                         is_leaf=lambda x: hasattr(x, "value"))
    assert not queue["valid"].any()
    for step in range(4):  # batches of 2 into 6 slots: the fourth batch overwrites the first
        keys = jnp.full((2, 2), float(step))
        keep = jnp.array([True, step != 2])
        queue = momentum.enqueue(queue, keys, -keys, keep)
    np.testing.assert_array_equal(queue["image"][:, 0], [3, 3, 1, 1, 2, 2])
    np.testing.assert_array_equal(queue["text"], -queue["image"])  # pairs stay together
    np.testing.assert_array_equal(queue["valid"], [True, True, True, True, True, False])
    assert int(queue["pointer"]) == 2


def test_queue_size_must_hold_whole_batches():
    momentum.check_queue_size(0, 48)
    momentum.check_queue_size(96, 48)
    with pytest.raises(ValueError, match=r"config.method.queue_size=100 .* multiple of config.train.batch_size=48"):
        momentum.check_queue_size(100, 48)


def test_ema_update_moves_towards_params_without_gradient():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(momentum.ema_update(ema, params, 0.9)["w"], 0.1)
    grad = jax.grad(lambda p: momentum.ema_update(ema, p, 0.9)["w"].sum())(params)
    np.testing.assert_array_equal(grad["w"], 0.0)


def test_adaptive_filter_drops_low_similarity_pairs_after_warmup():
    cfg = ml_collections.ConfigDict(dict(enabled=True, alpha=1.0, decay=0.9, warmup_steps=3))
    rng = np.random.default_rng(4)
    noisy = np.zeros(200, bool)
    noisy[:40] = True  # 20% noise: similarity near 0 instead of near 0.6
    stats = momentum.init_filter()
    for step in range(6):
        similarity = np.where(noisy, rng.normal(0.0, 0.05, 200), rng.normal(0.6, 0.05, 200)).astype(np.float32)
        keep, stats, metrics = momentum.adaptive_filter(stats, jnp.asarray(similarity), jnp.int32(step), cfg)
        if step < 3:
            assert float(metrics["amf/filtered_fraction"]) == 0.0  # warm-up: nothing filtered
    quality = momentum.filter_quality(keep, jnp.asarray(noisy))
    assert float(quality["amf/precision"]) == 1.0 and float(quality["amf/recall"]) == 1.0
    disabled = ml_collections.ConfigDict({**cfg.to_dict(), "enabled": False})
    assert float(momentum.adaptive_filter(stats, jnp.asarray(similarity), jnp.int32(9), disabled)[0].min()) == 1.0


def test_mlm_mask_follows_bert_proportions_and_skips_special_tokens():
    cfg = ml_collections.ConfigDict(dict(ratio=0.15, mask_fraction=0.8, random_fraction=0.1))
    tokens = np.zeros((4000, 12), np.int32)
    tokens[:, 0], tokens[:, 1:10], tokens[:, 10] = 2, 7, 3  # BOS, 9 words, EOS, pad
    inputs, masked, predict = mlm_mask(jax.random.PRNGKey(0), jnp.asarray(tokens), cfg, 128)
    predict, masked, inputs = np.asarray(predict), np.asarray(masked), np.asarray(inputs)
    assert not predict[:, [0, 10, 11]].any()  # never BOS, EOS or pad
    assert predict[:, 1:10].mean() == pytest.approx(0.15 + 0.85 * (1 / 9) * 0.85 ** 8, abs=0.01)  # ≥1 per row
    assert predict.sum(1).min() >= 1
    assert masked.sum() / predict.sum() == pytest.approx(0.8, abs=0.02)
    changed = (inputs != tokens) & predict & ~masked
    assert changed.sum() / predict.sum() == pytest.approx(0.1 * (1 - 1 / 124), abs=0.02)
    assert (inputs[~predict] == tokens[~predict]).all()


def test_block_mask_reaches_but_never_exceeds_the_ratio():
    cfg = ml_collections.ConfigDict(dict(ratio=0.4, min_block_fraction=0.08, max_aspect=3.0, attempts=20))
    mask = np.asarray(block_mask(jax.random.PRNGKey(0), 64, 14, cfg))
    counts = mask.sum(1)
    assert counts.max() <= round(0.4 * 196) and counts.mean() > 0.9 * 0.4 * 196
    grid = mask[0].reshape(14, 14)  # blockwise: most masked patches have a masked neighbour
    neighbours = np.zeros_like(grid)
    neighbours[1:] |= grid[:-1]
    neighbours[:-1] |= grid[1:]
    neighbours[:, 1:] |= grid[:, :-1]
    neighbours[:, :-1] |= grid[:, 1:]
    assert (grid & neighbours).sum() >= 0.9 * grid.sum()
    np.testing.assert_array_equal(mask, block_mask(jax.random.PRNGKey(0), 64, 14, cfg))
