"""The sharded local-loss InfoNCE equals the single-device loss on the global batch, values and gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax import parallel
from vlp_jax.objectives.contrastive import clip_loss
from vlp_jax.objectives.sigmoid import sigmoid_loss


def reference_loss(image, text, scale):
    """Plain symmetric InfoNCE over the whole batch on one device."""
    logits = scale * image @ text.T  # [B, B]
    labels = jnp.arange(len(image))
    i2t = -jax.nn.log_softmax(logits, axis=1)[labels, labels]
    t2i = -jax.nn.log_softmax(logits.T, axis=1)[labels, labels]
    return (i2t.mean() + t2i.mean()) / 2


def unit_rows(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_sharded_loss_and_grads_equal_single_device(shape):
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, (32, 16)), unit_rows(rng, (32, 16))
    scale = jnp.float32(10.0)
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))))
    sharding = parallel.batch_sharding(mesh)
    image_s, text_s = jax.device_put(image, sharding), jax.device_put(text, sharding)

    def sharded(i, t, s):
        return clip_loss(i, t, s, mesh)[0]

    loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(image_s, text_s, scale)
    ref_loss, ref_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2))(image, text, scale)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_accuracy_counts_matching_pairs():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, model=1)))
    eye = np.eye(16, dtype=np.float32)
    text = eye.copy()
    text[[0, 1]] = text[[1, 0]]  # two swapped captions: 14 of 16 images find their own text
    _, metrics = jax.jit(lambda i, t: clip_loss(i, t, jnp.float32(10.0), mesh))(eye, text)
    assert float(metrics["i2t_accuracy"]) == pytest.approx(14 / 16)


@pytest.mark.parametrize("shape, chunk, ring", [((1, 1, 1), 5, False), ((2, 2, 2), 7, False), ((2, 2, 2), 64, False),
                                               ((8, 1, 1), 0, True), ((2, 2, 2), 3, True)])
def test_the_blocked_loss_equals_the_whole_logits_loss(shape, chunk, ring):
    """contrastive_chunk: column blocks (5, 7 and 3 do not divide the 32 or the 4 rows: a padded last block) with an
    online log-sum-exp give the reference loss, gradients and accuracy, sharded or not; contrastive_ring: the keys
    pass round the replicas instead of being gathered, whole or in blocks."""
    rng = np.random.default_rng(1)
    image, text = unit_rows(rng, (32, 16)), unit_rows(rng, (32, 16))
    text[3] = image[3]  # a few certain matches, so the accuracy is not trivially 0
    scale = jnp.float32(20.0)
    devices = int(np.prod(shape))
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))),
                              devices=jax.devices()[:devices])
    sharding = parallel.batch_sharding(mesh)
    image_s, text_s = jax.device_put(image, sharding), jax.device_put(text, sharding)

    def blocked(i, t, s):
        return clip_loss(i, t, s, mesh, chunk=chunk, ring=ring)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1, 2), has_aux=True))(
        image_s, text_s, scale)
    ref_loss, ref_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2))(image, text, scale)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    want_accuracy = np.mean(np.argmax(image @ text.T, axis=1) == np.arange(32))
    assert float(metrics["i2t_accuracy"]) == pytest.approx(want_accuracy)


def test_the_blocked_loss_never_holds_the_whole_logits():
    """XLA's own memory estimate of the loss and its gradient for 4,096 pairs on one device: the whole [B, B]
    logits (64 MiB each) against blocks of 256 columns."""
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), devices=jax.devices()[:1])
    rows = jax.ShapeDtypeStruct((4096, 32), jnp.float32)

    def temp_bytes(chunk):
        step = jax.jit(jax.grad(lambda i, t: clip_loss(i, t, jnp.float32(10.0), mesh, chunk=chunk)[0],
                                argnums=(0, 1)))
        return step.lower(rows, rows).compile().memory_analysis().temp_size_in_bytes

    whole, blocked = temp_bytes(0), temp_bytes(256)
    assert whole >= 2 * 4096 * 4096 * 4  # at least both directions' logits
    assert blocked < whole / 8, (blocked, whole)


def test_the_blocked_loss_refuses_what_it_does_not_cover():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), devices=jax.devices()[:1])
    from vlp_jax.objectives.contrastive import contrastive_loss

    rows = jnp.ones((4, 8)) / jnp.sqrt(8.0)
    with pytest.raises(ValueError, match="contrastive_chunk=2: .*in-batch negatives only.*leave it off"):
        contrastive_loss(rows, rows, jnp.float32(1.0), mesh, with_kl=True, chunk=2)
    with pytest.raises(ValueError, match="contrastive_ring=True: .*not a queue"):
        queue = {"a": rows, "b": rows, "valid": jnp.ones(4, bool)}
        contrastive_loss(rows, rows, jnp.float32(1.0), mesh, queue=queue, ring=True)


def test_the_ring_never_holds_the_gathered_logits():
    """XLA's memory estimate of loss + gradient for 4,096 pairs over 8 devices (512 rows each): the ring keeps
    one visiting block's [512, 512] logits live per hop, not the [512, 4,096] of the gathered keys."""
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, model=1)))
    rows = jax.ShapeDtypeStruct((4096, 32), jnp.float32, sharding=parallel.batch_sharding(mesh))

    def temp_bytes(ring):
        step = jax.jit(jax.grad(lambda i, t: clip_loss(i, t, jnp.float32(10.0), mesh, ring=ring)[0],
                                argnums=(0, 1)))
        return step.lower(rows, rows).compile().memory_analysis().temp_size_in_bytes

    whole, ring = temp_bytes(False), temp_bytes(True)
    assert whole >= 2 * 512 * 4096 * 4  # both directions' gathered logits
    assert ring < whole / 3, (ring, whole)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_the_ring_backward_holds_one_visiting_block_whatever_the_replica_count(loss):
    """Per-replica rows fixed (1,024 × 256 float32: 1 MiB a block), 2 then 8 replicas: XLA's temp memory of loss +
    gradient with ring + chunk grows by less than 5 blocks. The backward pass sends the blocks round again
    (parallel.ring_over_batch) instead of keeping each hop's block and its gradient, which grew by 8 (sigmoid) to
    18 (softmax) blocks here."""
    def temp_mib(replicas):
        mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=replicas, fsdp=1, model=1)),
                                  devices=jax.devices()[:replicas])
        rows = jax.ShapeDtypeStruct((replicas * 1024, 256), jnp.float32, sharding=parallel.batch_sharding(mesh))

        def value(i, t):
            if loss == "softmax":
                return clip_loss(i, t, jnp.float32(10.0), mesh, chunk=128, ring=True)[0]
            return sigmoid_loss(i, t, jnp.float32(10.0), jnp.float32(-10.0), mesh, chunk=128, ring=True)["loss"]

        step = jax.jit(jax.grad(value, argnums=(0, 1)))
        return step.lower(rows, rows).compile().memory_analysis().temp_size_in_bytes / 2**20

    two, eight = temp_mib(2), temp_mib(8)
    assert eight - two < 5, (two, eight)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_the_ring_switch_trains_the_same_step(name):
    """config.train.contrastive_ring reaches the method's loss: the same loss and gradients on a (2, 2, 2) mesh."""
    import flax.linen as nn

    from configs import clip, siglip
    from tests.helpers import small_towers
    from vlp_jax import methods
    from vlp_jax.checkpoint import leaves_by_path

    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2)))
    outputs = []
    for ring in (False, True):
        config = small_towers({"clip": clip, "siglip": siglip}[name].get_config("tiny"))
        config.train.contrastive_ring = ring
        method = methods.build(config, mesh)
        size, length = config.model.image.image_size, config.model.text.max_len
        batch = {"image": np.random.default_rng(1).integers(0, 256, (16, size, size, 3), dtype=np.uint8),
                 "text": np.random.default_rng(2).integers(4, 50, (16, length)).astype(np.int32)}
        params, extra = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch))
        with parallel.mesh_context(mesh):
            sharded = parallel.global_batch_from_local(batch, mesh)
            fn = jax.jit(lambda p, b, m=method, e=extra: m.loss_and_grads(p, e, b, jax.random.PRNGKey(0), 0))
            (loss, _), grads = fn(params, sharded)
        outputs.append((float(loss), leaves_by_path(grads)))
    (whole_loss, whole), (ring_loss, ring) = outputs
    np.testing.assert_allclose(ring_loss, whole_loss, rtol=1e-6)
    for path, value in whole.items():
        np.testing.assert_allclose(ring[path], value, rtol=1e-4, atol=1e-6, err_msg=path)
