"""COOKIE: the three terms' loss and gradients sharded = single device; a frozen teacher trains end to end
unchanged, with the unimodal evaluation in the final report."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip, cookie
from tests.helpers import read_metrics, small_towers, tiny_config
from tests.integration.test_cots import assert_trees_close, batch_of, mesh_of
from vlp_jax import checkpoint, methods, parallel, step, train

TERMS = ("cross_loss", "visual_loss", "textual_loss", "visual_teacher_agreement", "textual_teacher_agreement")


def small_cookie():
    config = small_towers(cookie.get_config("tiny"))
    config.method.head.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    return config


@pytest.fixture(scope="module")
def frozen_visual_momentum_textual():
    """Visual knowledge sharing from a frozen (untrained, wider) CLIP image tower, textual from the momentum student:
    both teacher kinds and the teacher adapter in one config; its params, extra and single-device step."""
    config = small_cookie()
    config.method.teacher.update(dict(image="frozen", image_run="(in memory)"))
    config.method.second_view.update(dict(image=True, text=True))  # the teachers see the batch's other views
    config.train.param_groups = {"teachers": cookie.FROZEN_GROUP}
    teacher = small_towers(clip.get_config("tiny"))
    teacher.model.embed_dim = 24  # unlike the student's 16: the adapter maps it into the joint space
    pretrained = {"visual_teacher": step.random_run(teacher, ("params",), mesh_of((1, 1, 1)))}
    method = methods.build(config, mesh_of((1, 1, 1)), pretrained)
    params, extra = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch_of(config)))
    return config, pretrained, params, extra, loss_and_grads(config, pretrained, params, extra, mesh_of((1, 1, 1)))


def batch_with_views(config, seed=0, views=None):
    """batch_of's images and texts, plus the second views the config declares: another batch's (`views` None) or
    the given ones."""
    batch = batch_of(config, seed)
    other = views if views is not None else batch_of(config, seed + 100)
    second = config.method.second_view
    return batch | ({"image_view": other["image"]} if second.image else {}) | (
        {"text_view": other["text"]} if second.text else {})


def loss_and_grads(config, pretrained, params, extra, mesh, seed=0, views=None):
    method = methods.build(config, mesh, pretrained)
    with parallel.mesh_context(mesh):
        batch = parallel.global_batch_from_local(batch_with_views(config, seed, views), mesh)
        fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
        (loss, (metrics, new_extra)), grads = fn(params, extra, batch, jax.random.PRNGKey(0), jnp.int32(0))
    return loss, metrics, new_extra, grads


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_all_three_terms_sharded_equal_single_device(frozen_visual_momentum_textual, shape):
    config, pretrained, params, extra, want = frozen_visual_momentum_textual
    got = loss_and_grads(config, pretrained, params, extra, mesh_of(shape))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for term in TERMS:
        np.testing.assert_allclose(got[1][term], want[1][term], rtol=1e-5, err_msg=term)
        assert np.isfinite(want[1][term]), term
    assert min(float(want[1][term]) for term in TERMS if term.endswith("loss")) > 0
    assert_trees_close(got[3], want[3])
    assert_trees_close(got[2]["ema"], want[2]["ema"], rtol=1e-5, atol=2e-6)
    grads = checkpoint.leaves_by_path(want[3])
    # Each knowledge-sharing term reaches the student; the frozen teacher gets no gradient, its adapter does.
    assert all(not np.any(value) for path, value in grads.items() if path.startswith("visual_teacher/"))
    assert np.any(grads["visual_teacher_adapter/dense/kernel"])
    for side in ("visual", "textual"):
        assert np.any(grads[f"temperatures/{side}/scale/log_scale"]), side


def test_the_teachers_see_the_second_views(frozen_visual_momentum_textual):
    """With views equal to the student's own inputs the loss is that of second_view off; other views change it."""
    config, pretrained, params, extra, want = frozen_visual_momentum_textual
    assert methods.build(config, mesh_of((1, 1, 1)), pretrained).features(config) == (
        "image", "text", "image_view", "text_view")
    same = loss_and_grads(config, pretrained, params, extra, mesh_of((1, 1, 1)), views=batch_of(config, 0))
    off = config.copy_and_resolve_references()
    off.method.second_view.update(dict(image=False, text=False))
    reference = loss_and_grads(off, pretrained, params, extra, mesh_of((1, 1, 1)))
    np.testing.assert_allclose(same[0], reference[0], rtol=1e-6)
    for term in TERMS:
        np.testing.assert_allclose(same[1][term], reference[1][term], rtol=1e-6, err_msg=term)
        if term != "cross_loss":  # the views reach only the knowledge-sharing terms
            assert abs(float(want[1][term]) - float(reference[1][term])) > 1e-4, term


def test_a_frozen_clip_teacher_stays_bit_identical_through_training(trained_runs, tmp_path):
    _, clip_dir, _, _ = trained_runs("clip")
    config = cookie.use_frozen_teachers(small_cookie(), str(clip_dir))
    config.data = tiny_config().data.copy_and_resolve_references()
    config.data.tokenizer.path = str(clip_dir / "tokenizer.model")
    config.data.train_size = 128
    config.train.update(dict(steps=3, log_every=1, warmup_steps=1, param_groups={"teachers": cookie.FROZEN_GROUP}))
    config.eval.update(dict(every=1000, batch_size=16, max_examples=32))
    for name in ("zeroshot", "efficiency", "picture"):  # the method-independent evaluators are tested elsewhere
        del config.eval.evaluators[name]
    final = train.train_and_evaluate(config, str(tmp_path))
    report = json.loads((tmp_path / "eval" / "step_3.json").read_text())["sets"]["embedded"]
    assert 0 <= final["mean_r1"] <= 100 and 0 <= report["unimodal"]["i2i_r1"] <= 100
    assert 0 <= report["unimodal"]["t2t_r1"] <= 100
    logged = [record for record in read_metrics(tmp_path) if "train/loss" in record][-1]
    for term in TERMS:
        assert np.isfinite(logged[f"train/{term}"]), term
    saved = checkpoint.load_params(tmp_path, include=("(visual|textual)_teacher/.*",)).tree
    teacher = checkpoint.load_params(clip_dir, include=("towers/(image|text)_(tower|projection)/.*",)).tree["towers"]
    for side, modality in (("visual", "image"), ("textual", "text")):
        for part in ("tower", "projection"):
            got = checkpoint.leaves_by_path(saved[f"{side}_teacher"][f"{modality}_{part}"])
            want = checkpoint.leaves_by_path(teacher[f"{modality}_{part}"])
            assert got.keys() == want.keys()
            for path in want:
                np.testing.assert_array_equal(got[path], want[path], err_msg=f"{side}/{path}")
