"""The platform's extension points, used from outside the package: a method registered by a test that declares an
extra data feature (boxes) and adds an evaluator trains end to end and reports both; init_from with include
patterns warm-starts only what it names."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.helpers import read_metrics, tiny_config
from vlp_jax import methods, step, train
from vlp_jax.checkpoint import Checkpointer, abstract_like
from vlp_jax.evaluate import run as eval_run
from vlp_jax.evaluate.context import EvalPass, Evaluator, Result, set_result
from vlp_jax.methods.base import Feature
from vlp_jax.methods.clip import ClipMethod


class BoxCountingClip(ClipMethod):
    """CLIP that also asks the data for object boxes and logs how many each image carries."""

    @classmethod
    def features(cls, config):
        return ("image", "text", "boxes")

    @classmethod
    def example_batch(cls, config):
        boxes = config.data.max_boxes
        return {**super().example_batch(config), "boxes": Feature((boxes, 4), "float32"),
                "box_mask": Feature((boxes,), "bool")}

    @classmethod
    def evaluators(cls, config):
        return {"spread": {"type": "embedding_spread", "every": -1}}

    def loss(self, params, extra, batch, rng, step):
        loss, (metrics, extra) = super().loss(params, extra, batch, rng, step)
        metrics["boxes_per_image"] = batch["box_mask"].sum(axis=-1).mean()
        inside = (batch["boxes"] >= 0) & (batch["boxes"] <= 1)
        metrics["boxes_inside"] = jnp.where(batch["box_mask"][..., None], inside, True).all()
        return loss, (metrics, extra)


class EmbeddingSpread(Evaluator):
    """The mean cosine similarity of distinct eval images' embeddings, and how many images it saw."""

    def __call__(self, evaluation: EvalPass) -> Result:
        images, _ = evaluation.embeddings()
        cosine = images @ images.T
        count = len(images)
        mean = (cosine.sum() - np.trace(cosine)) / (count * (count - 1))
        return set_result(evaluation, "spread", {"mean_cosine": float(mean), "images": count}, key_prefix="spread/")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    methods.register("box_counting_clip", BoxCountingClip)
    eval_run.register("embedding_spread", EmbeddingSpread)
    config = tiny_config(steps=10)
    config.method.name = "box_counting_clip"
    config.eval.update(dict(every=5, subset_size=16))
    workdir = tmp_path_factory.mktemp("toy")
    final = train.train_and_evaluate(config, str(workdir))
    return config, workdir, final


def test_a_registered_method_gets_its_declared_feature_and_evaluator(toy_run):
    config, workdir, final = toy_run
    records = read_metrics(workdir)
    objects = config.data.world.max_objects  # every scene of the tiny world holds this many, all in view
    train_records = [r for r in records if "train/boxes_per_image" in r]
    assert len(train_records) == 2 and all(r["train/boxes_per_image"] == objects for r in train_records)
    assert all(r["train/boxes_inside"] == 1 for r in train_records)
    # The added evaluator ran with the suite: on the subset at step 5, on the whole set at the end.
    assert [r["step"] for r in records if "eval/embedded_subset/spread/images" in r] == [5]
    assert [r["eval/embedded_subset/spread/images"] for r in records if "eval/embedded_subset/spread/images" in r] \
        == [16]
    report = json.loads((workdir / train.EVAL_DIR / "step_10.json").read_text())
    spread = report["sets"]["embedded"]["spread"]
    assert spread["images"] == 64 and -1.0 <= spread["mean_cosine"] < 1.0
    assert set(report["sets"]["embedded"]) == {"retrieval", "unimodal", "twins", "efficiency", "spread"}  # added
    assert final == report["sets"]["embedded"]["retrieval"]


def restored_params(config, workdir):
    run = step.setup(config)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state, _ = checkpointer.restore(checkpointer.latest_step(), abstract_like(run.state, run.shardings))
    checkpointer.close()
    return jax.device_get(state.params), jax.device_get(run.state.params)


def test_init_from_with_include_patterns_warm_starts_only_what_it_names(tiny_run, tmp_path):
    source_params, _ = restored_params(tiny_config(), tiny_run[0])
    config = tiny_config(steps=1, learning_rate=0.0)  # a step that changes nothing: what we see is what was loaded
    config.eval.final = False
    config.init_from = str(tiny_run[0])
    config.init.include = ("towers/image_tower/.*",)
    config.init.exclude = ("towers/image_tower/cls",)
    train.train_and_evaluate(config, str(tmp_path))
    params, fresh = restored_params(config, tmp_path)
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    saved = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source_params)}
    init = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(fresh)}
    loaded = [key for key in flat if "image_tower" in key and "'cls'" not in key]
    assert len(loaded) > 5
    for key, value in flat.items():
        want = saved[key] if key in loaded else init[key]
        np.testing.assert_array_equal(value, want, err_msg=key)
    assert any(not np.array_equal(saved[key], init[key]) for key in loaded)  # the source really differs


def test_an_unknown_evaluator_type_is_named(tmp_path):
    config = tiny_config(steps=1)
    config.eval.evaluators.bogus = ml_collections.ConfigDict(dict(type="no_such_type", every=0))
    with pytest.raises(ValueError, match=r"config.eval.evaluators.bogus.type='no_such_type' is unknown"):
        train.train_and_evaluate(config, str(tmp_path))
