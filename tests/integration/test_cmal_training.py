"""CMAL end to end: the loss (contrastive, mined hard negatives, AMC, MLM) equal on one device and on a (2, 2, 2)
mesh; a short run on the embedded world logs every term and reports two-tower and re-ranked retrieval."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cmal
from tests.helpers import read_metrics, small_towers, tiny_config
from vlp_jax import methods, parallel, train

TERMS = ("itc_loss", "itm_loss", "amc_loss", "mlm_loss", "align_loss")


def mesh_of(shape):
    return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))),
                              devices=jax.devices()[: int(np.prod(shape))])


def small_cmal():
    config = small_towers(cmal.get_config("tiny"))
    config.method.unified.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    config.data.max_boxes = 4
    return config


def anchored_batch(config, seed=0):
    """16 examples: random words, two boxes each (concepts 1 and 2 at tokens 3 and 6), the last four without
    boxes (patch regions, no anchors)."""
    rng = np.random.default_rng(seed)
    size, length, boxes = config.model.image.image_size, config.model.text.max_len, config.data.max_boxes
    text = rng.integers(4, config.model.text.vocab_size, (16, length)).astype(np.int32)
    text[:, 0], text[:, 12], text[:, 13:] = 2, 3, 0
    token_words = np.full((16, length), -1, np.int32)
    token_words[:, 1:12] = np.arange(11)
    token_tags = np.zeros((16, length), np.int32)
    token_tags[:12, 3], token_tags[:12, 6] = 1, 2
    region_tags = np.zeros((16, boxes), np.int32)
    region_tags[:12, 0], region_tags[:12, 1] = 2, 1
    box = np.zeros((16, boxes, 4), np.float32)
    box[:12, 0], box[:12, 1] = [0.0, 0.0, 0.5, 0.6], [0.4, 0.5, 1.0, 1.0]
    return {"image": rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8), "text": text, "boxes": box,
            "box_mask": box.any(-1), "region_tags": region_tags, "token_tags": token_tags,
            "token_words": token_words, "boxes_dropped": np.zeros(16, np.int32)}


def loss_on(config, shape, params):
    mesh = mesh_of(shape)
    method = methods.build(config, mesh)
    with parallel.mesh_context(mesh):
        batch = parallel.global_batch_from_local(anchored_batch(config), mesh)
        return jax.jit(method.loss)(params, {}, batch, jax.random.PRNGKey(1), jnp.int32(0))


def test_cmal_loss_and_every_term_equal_on_one_device_and_a_2x2x2_mesh():
    config = small_cmal()
    method = methods.build(config, mesh_of((1, 1, 1)))
    params, _ = nn.meta.unbox(method.init(jax.random.PRNGKey(0), anchored_batch(config)))
    single, (single_metrics, _) = loss_on(config, (1, 1, 1), params)
    sharded, (sharded_metrics, _) = loss_on(config, (2, 2, 2), params)
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    for term in (*TERMS, "amc_accuracy", "itm_accuracy", "anchors/tag_free_precision"):
        np.testing.assert_allclose(sharded_metrics[term], single_metrics[term], rtol=2e-5, atol=1e-6, err_msg=term)
    assert float(single_metrics["amc/swapped_per_example"]) > 0  # anchors were swapped in this comparison
    assert float(single_metrics["amc/chance"]) == pytest.approx(0.5)  # two anchors per anchored example


def test_a_short_cmal_run_logs_every_term_and_reranks(tmp_path):
    config = small_cmal()
    config.data = tiny_config().data
    config.data.max_boxes = 4
    config.data.train_size, config.data.eval_size = 64, 16
    config.train.update(dict(steps=3, log_every=3, warmup_steps=1))
    config.method.rerank.k = 4
    config.eval.update(dict(every=1000, batch_size=16, max_examples=16))
    config.eval.evaluators = {"retrieval": dict(type="retrieval", every=-1)}  # + the method's re-ranking
    final = train.train_and_evaluate(config, str(tmp_path))
    logged = [record for record in read_metrics(tmp_path) if "train/loss" in record][-1]
    for term in (*TERMS, "amc_accuracy", "amc/chance", "anchors/tag_free_recall", "boxes_dropped", "loss"):
        assert np.isfinite(logged[f"train/{term}"]), term
    assert logged["train/anchors/tag_pairs_per_example"] > 1  # the world's captions name its tagged objects
    assert 0 < logged["train/amc/chance"] < 1
    report = read_metrics(tmp_path)[-1]
    reranked = {key.rsplit("/", 1)[1]: value for key, value in report.items() if "/rerank/" in key}
    assert reranked["pairs"] == 16 * 4 + 80 * 4  # 16 images and their 80 captions, 4 candidates each
    assert reranked["k"] == 4 and reranked["cross_encoder_s_estimated"] > 0
    # Re-ranking only reorders the top k: beyond it the two-tower recall stands.
    assert reranked["i2t_r10"] == pytest.approx(final["i2t_r10"])
