"""Exact gradient accumulation (config.train.microbatches): the loss and gradient of the whole global batch, with
one micro-batch's activations live at a time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import brivl, clip, cmal, cookie, cots, siglip, vq
from tests.helpers import small_towers
from vlp_jax import methods, parallel, step
from vlp_jax.checkpoint import leaves_by_path


def mesh_of(shape):
    axes = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True)))
    return parallel.make_mesh(axes, devices=jax.devices()[: int(np.prod(shape))])


def batch_of(config, size):
    rng = np.random.default_rng(0)
    text = rng.integers(4, config.model.text.vocab_size, (size, config.model.text.max_len)).astype(np.int32)
    text[:, 0], text[:, 6], text[:, 7:] = 2, 3, 0
    pixels = config.model.image.image_size
    batch = {"image": rng.integers(0, 256, (size, pixels, pixels, 3), dtype=np.uint8), "text": text}
    if config.method.get("second_view", {}).get("image"):  # COOKIE's teacher sees another view of the image
        batch["image_view"] = batch["image"][:, :, ::-1]
    if config.method.name == "cmal":  # boxes with corners in order, a few of them missing; random concept tags
        boxes = config.data.max_boxes
        x, y = (np.sort(rng.random((size, boxes, 2)), axis=-1) for _ in range(2))
        box_mask = rng.random((size, boxes)) < 0.8
        batch.update(boxes=np.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1).astype(np.float32),
                     box_mask=box_mask,  # only boxes that are there carry tags
                     region_tags=np.where(box_mask, rng.integers(0, boxes + 1, (size, boxes)), 0).astype(np.int32),
                     token_tags=np.where(text > 0, rng.integers(0, boxes + 1, text.shape), 0).astype(np.int32),
                     token_words=np.where(text > 0, np.arange(text.shape[1]), -1).astype(np.int32),
                     boxes_dropped=np.zeros(size, np.int32))
    return batch


def loss_and_grads(config, mesh, microbatches, size=32, with_extra=False, pretrained=None, noisy=False):
    method = methods.build(config, mesh, pretrained)
    batch = batch_of(config, size)
    if noisy:  # ground-truth noise flags (noisy shards): scored against the momentum filter, never in the loss
        batch["noisy"] = np.arange(size) % 4 == 0
    params, extra = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch))
    with parallel.mesh_context(mesh):
        sharded = parallel.global_batch_from_local(batch, mesh)
        fn = jax.jit(lambda p, b: method.loss_and_grads(p, extra, b, jax.random.PRNGKey(0), jnp.int32(3),
                                                        microbatches))
        (loss, (metrics, new_extra)), grads = fn(params, sharded)
        memory = fn.lower(params, sharded).compile().memory_analysis().temp_size_in_bytes
    if with_extra:
        return float(loss), metrics, leaves_by_path(grads), leaves_by_path(new_extra)
    return float(loss), metrics, leaves_by_path(grads), memory


def assert_close_gradient(got, want, path):
    """Equal up to float32 sums taken in another order: the rounding of an entry grows with the gradient's scale,
    so the absolute tolerance is 1e-5 of its largest entry (at least 1e-5)."""
    atol = 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=path)


@pytest.mark.parametrize("name, shape, microbatches", [("clip", (2, 2, 2), 4), ("siglip", (4, 1, 1), 2)])
def test_accumulated_gradient_equals_the_whole_batch_gradient(name, shape, microbatches):
    config = small_towers({"clip": clip, "siglip": siglip}[name].get_config("tiny"))
    mesh = mesh_of(shape)
    whole_loss, whole_metrics, whole, _ = loss_and_grads(config, mesh, 1)
    loss, metrics, grads, _ = loss_and_grads(config, mesh, microbatches)
    np.testing.assert_allclose(loss, whole_loss, rtol=1e-6)
    for key, value in whole_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)
    assert sorted(grads) == sorted(whole)
    for path, value in whole.items():
        assert_close_gradient(grads[path], value, path)
    assert any(np.abs(value).max() > 0 for value in whole.values())


def assert_accumulates_exactly(config, shape, pretrained=None, noisy=False):
    """K = 2 and 8 micro-batches give the whole batch's loss, metrics and gradient, and the same EMA, filter
    statistics and queue after the step."""
    mesh = mesh_of(shape)
    run = dict(with_extra=True, pretrained=pretrained, noisy=noisy)
    whole_loss, whole_metrics, whole, whole_extra = loss_and_grads(config, mesh, 1, **run)
    assert any(np.abs(value).max() > 0 for value in whole.values())
    for microbatches in (2, 8):
        loss, metrics, grads, extra = loss_and_grads(config, mesh, microbatches, **run)
        np.testing.assert_allclose(loss, whole_loss, rtol=1e-6)
        assert sorted(metrics) == sorted(whole_metrics)
        for key, value in whole_metrics.items():  # (the filter's statistics are means of keys: float32 rounding)
            np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
        assert sorted(grads) == sorted(whole)
        for path, value in whole.items():
            assert_close_gradient(grads[path], value, path)
        assert sorted(extra) == sorted(whole_extra)
        for path, value in whole_extra.items():
            # keys of micro-batch shapes: XLA sums their matmuls in another order (float32 rounding, ~4e-7)
            np.testing.assert_allclose(extra[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
    return whole_metrics


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_brivl_accumulates_exactly_and_advances_its_state_once(shape):
    """BriVL with a paired queue and the adaptive filter on."""
    config = small_towers(brivl.get_config("tiny"), queue_size=64)
    config.method.amf.update(dict(enabled=True, warmup_steps=1))  # the filter acts at step 3
    assert_accumulates_exactly(config, shape)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_cots_accumulates_its_token_level_terms_exactly(shape):
    """COTS with MLM, MVM, KL, the queue and the filter: the masks are drawn once for the global batch and each
    term is normalised by the global count of predicted positions, so micro-batches add up to the whole batch."""
    config = small_towers(cots.get_config("tiny"), queue_size=64)
    config.method.mvm.tokenizer = "random"
    config.method.amf.warmup_steps = 1
    pretrained = step.load_pretrained(config, mesh_of((1, 1, 1)))  # {"tokenizer": an untrained VQ run}
    metrics = assert_accumulates_exactly(config, shape, pretrained, noisy=True)
    assert {"mlm_loss", "mvm_loss", "kl_loss", "amf/precision"} <= set(metrics)
    assert metrics["mvm_loss"] > 0 and metrics["mlm_loss"] > 0


def test_cookie_accumulates_its_teacher_terms_exactly():
    """COOKIE with momentum teachers on both sides, the image teacher on a second view: the teachers' keys are
    per-example constants, the momentum student advances once."""
    config = small_towers(cookie.get_config("tiny"))
    config.method.second_view.image = True
    metrics = assert_accumulates_exactly(config, (2, 2, 2))
    assert {"cross_loss", "visual_loss", "textual_loss"} <= set(metrics)


def test_accumulation_holds_one_micro_batch_of_activations():
    """XLA's temp memory of the step's loss and gradient at batch 256: 8 micro-batches need far less."""
    config = small_towers(clip.get_config("tiny"))
    mesh = mesh_of((1, 1, 1))
    *_, whole = loss_and_grads(config, mesh, 1, size=256)
    *_, accumulated = loss_and_grads(config, mesh, 8, size=256)
    assert accumulated < whole / 3, (accumulated, whole)


@pytest.mark.parametrize("source, target", [("tags", "pairing"), ("similarity", "word")])
def test_cmal_accumulates_exactly_with_hard_negatives_from_the_whole_batch(source, target):
    """CMAL with every term on: the hard negatives are mined from the global batch and matched against the other
    example's caption or regions (embedding_loss), the anchors, swaps and MLM masks are drawn once per global batch
    and each per-example term is divided by its global count."""
    config = small_towers(cmal.get_config("tiny"))
    config.method.anchors.update(dict(source=source, align_weight=0.5))
    config.method.amc.target = target
    config.method.mlm.weight = 1.0
    metrics = assert_accumulates_exactly(config, (2, 2, 2))
    assert {"itc_loss", "itm_loss", "amc_loss", "mlm_loss", "align_loss"} <= set(metrics)
    assert metrics["amc/swapped_per_example"] > 0 and metrics["itm_loss"] > 0


def test_methods_without_the_split_and_bad_counts_are_refused():
    mesh = mesh_of((1, 1, 1))
    with pytest.raises(ValueError, match="microbatches=2: method 'vq' has no embed/embedding_loss split"):
        methods.build(vq.get_config("tiny"), mesh).loss_and_grads(None, None, {}, None, 0, 2)
    assert all(methods.get(name).accumulates() for name in ("clip", "siglip", "brivl", "cots", "cookie", "cmal"))
    with pytest.raises(ValueError, match="microbatches=3 does not divide the global batch 32"):
        loss_and_grads(small_towers(clip.get_config("tiny")), mesh, 3)
