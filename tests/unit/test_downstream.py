"""Downstream tasks on the data side and in the evaluator: the `task` feature's query and target (REC's target row
follows the crop's kept boxes), the eval items, VQA answer normalisation and score, IoU, the task figures and their
chance levels, and the fine-tuning configs."""

import io

import numpy as np
import pytest
from PIL import Image

from configs.finetune import common as finetune_configs
from configs.finetune import rec, ve, vqa
from vlp_jax.data import examples, tasks, tokenizer, transforms
from vlp_jax.data.records import ImageTextRecord, Located
from vlp_jax.data.skips import Skipped
from vlp_jax.evaluate import downstream
from vlp_jax.methods import finetune

MAX_LEN = 16
SIDE = 40


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    texts = ["there is a red circle", "what colour is the square", "the object left of the blue cross", "yes no",
             "a large green triangle is made of wood", "how many circles are there"]
    return tokenizer.train_tokenizer(texts * 20, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=64)


def png(side: int = SIDE) -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(data, "PNG")
    return data.getvalue()


def image_options(crop_scale=(1.0, 1.0)) -> transforms.ImageOptions:
    return transforms.ImageOptions(size=32, max_pixels=1_000_000, background=(255, 255, 255), crop_scale=crop_scale,
                                   crop_ratio=(1.0, 1.0), crop_tries=10, resample=transforms.RESAMPLING["bilinear"])


BOXES = np.array([[0, 0, 10, 10], [15, 15, 25, 25], [30, 30, 40, 40]], np.float32)
LABELS = {
    "ve": [{"hypothesis": "there is a red circle", "label": "contradiction"}],
    "vqa": [{"question": "what colour is the square", "answers": ["Red", "red", "red.", "blue"]}],
    "rec": [{"expression": "the object left of the blue cross", "box": 2}],
}


def record(labels=None) -> ImageTextRecord:
    return ImageTextRecord(id="r", image=png(), captions=["a scene"], boxes=BOXES, tags=["a", "b", "c"],
                           labels=LABELS if labels is None else labels)


def build(task, words, labels=None, answers=(), crop_scale=(1.0, 1.0), seed=0):
    prepare = examples.TrainExamples(image_options(crop_scale), words, MAX_LEN, noisy=False,
                                     features=("image", "boxes", "task"), max_boxes=4, task=task, answers=answers)
    return prepare(Located(record(labels), "shard #3"), np.random.default_rng(seed))


def test_the_task_feature_gives_the_query_and_the_target_of_each_task(words):
    got = build("ve", words)
    assert got["target"] == tasks.VE_LABELS.index("contradiction")
    np.testing.assert_array_equal(got["query"], words.encode(["there is a red circle"], MAX_LEN)[0])
    got = build("vqa", words, answers=("blue", "green", "red"))
    # three of four annotators said red (after normalisation): score 1; one said blue: 1/3
    np.testing.assert_allclose(got["answer_scores"], [1 / 3, 0, 1])
    assert got["target"] == 2
    got = build("rec", words)
    assert got["target"] == 2 and got["box_mask"].sum() == 3


def test_rec_targets_follow_the_boxes_the_crop_keeps(words):
    """A crop that cuts some boxes away: the target is the row of the named box among the kept ones, and an item
    whose box was cut is never drawn (the record is skipped when none is left)."""
    hits = skipped = 0
    for seed in range(40):
        got = build("rec", words, crop_scale=(0.3, 0.5), seed=seed)
        if isinstance(got, Skipped):
            assert got.reason == examples.NO_TASK_ITEM
            skipped += 1
            continue
        kept = got["boxes"][got["box_mask"]]
        target = kept[got["target"]]
        # the target row is box 2 (x from 30 to 40) seen through the crop: its right edge is the crop's edge
        assert got["box_mask"][got["target"]] and target[2] == pytest.approx(1.0, abs=1e-6)
        hits += 1
    assert hits and skipped  # both cases occurred


def test_a_record_without_usable_items_is_skipped_with_the_reason(words):
    bad = {"ve": [{"hypothesis": " ", "label": "entailment"}, {"hypothesis": "x", "label": "maybe"}]}
    got = build("ve", words, labels=bad)
    assert isinstance(got, Skipped) and got.reason == examples.NO_TASK_ITEM and "shard #3" in got.where
    kept, reasons = tasks.valid_items("ve", bad["ve"], 0)
    assert not kept and "no hypothesis text" in reasons[0] and "'maybe'" in reasons[1]
    _, reasons = tasks.valid_items("rec", [{"expression": "the one", "box": 3}], 3)
    assert "not the index of one of the record's 3 boxes" in reasons[0]


def test_the_task_settings_are_checked(words):
    with pytest.raises(ValueError, match="answer vocabulary"):
        build("vqa", words)
    with pytest.raises(ValueError, match="config.data.task='caption'"):
        build("caption", words)
    with pytest.raises(ValueError, match="boxes feature"):
        examples.TrainExamples(image_options(), words, MAX_LEN, False, ("image", "task"), 4, task="rec")


def test_eval_items_hold_every_item_with_its_boxes(words):
    labels = {"rec": [{"expression": "the object left of the blue cross", "box": 2},
                      {"expression": "the red one", "box": 0}, {"expression": "bad", "box": 9}]}
    options = examples.FeatureOptions(image_options(), words, MAX_LEN, 4, task="rec")
    got = examples.TaskEvalExamples(image_options(), options)(Located(record(labels), "s #0"))
    np.testing.assert_array_equal(got["target"], [2, 0])
    np.testing.assert_allclose(got["target_box"], [[0.75, 0.75, 1, 1], [0, 0, 0.25, 0.25]])
    assert got["cropped_items"] == 0 and got["query"].shape == (2, MAX_LEN)


def test_vqa_answers_are_normalised_as_the_vqa_evaluation_does():
    assert tasks.normalise_answer("The Two dogs!") == "2 dogs"
    assert tasks.normalise_answer("an apple") == "apple"
    assert tasks.vqa_score("two", ["2", "2", "two", "3"]) == 1.0
    assert tasks.vqa_score("3", ["2", "2", "two", "3"]) == pytest.approx(1 / 3)
    assert tasks.vqa_score("4", ["2"]) == 0.0 and tasks.vqa_score("2", ["2"]) == 1.0  # one answer: 1 or 0


def test_box_iou_against_hand_computed_overlaps():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3]], float)
    np.testing.assert_allclose(downstream.box_iou(a, b), [1 / 7, 1.0, 0.0])


def test_task_figures_and_chance_levels():
    items = downstream.TaskItems(images=np.zeros((2, 1, 1, 3)), record=np.array([0, 0, 1]),
                                 query=np.zeros((3, 2)), target=np.array([0, 2, 0]), boxes=None, box_mask=None,
                                 target_box=None, answers=None, cropped=0, skipped={})
    ve_out = np.array([[5, 0, 0], [0, 5, 0], [5, 0, 0]], float)  # right, wrong, right
    got = downstream.task_metrics("ve", ve_out, items, ())
    assert got["ve_accuracy"] == pytest.approx(200 / 3) and got["ve_chance"] == pytest.approx(200 / 3)
    assert got["ve_accuracy_contradiction"] == 0 and got["ve_accuracy_entailment"] == 100
    boxes = np.array([[[0, 0, .5, .5], [.5, .5, 1, 1], [0, 0, 0, 0]], [[0, 0, 1, 1], [0, 0, .9, .9], [0, 0, .1, .1]]])
    items.boxes, items.box_mask = boxes, np.array([[True, True, False], [True, True, True]])
    items.target = np.array([1, 0, 0])
    items.target_box = np.array([[.5, .5, 1, 1], [0, 0, .5, .5], [0, 0, 1, 1]])
    rec_out = np.array([[0, 1, -np.inf], [0, 1, -np.inf], [0, 1, 0]], float)  # right; wrong; wrong box, IoU .81
    got = downstream.task_metrics("rec", rec_out, items, ())
    assert got["rec_top1"] == pytest.approx(100 / 3) and got["rec_accuracy_iou50"] == pytest.approx(200 / 3)
    assert got["rec_chance"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1 / 3) / 3)
    items.answers = [["red"], ["blue", "blue", "blue"], ["red", "red", "blue"]]
    got = downstream.task_metrics("vqa", np.array([[1, 0], [1, 0], [0, 1]]), items, ("red", "blue"))
    assert got["vqa_score"] == pytest.approx(100 * (1 + 0 + 1 / 3) / 3)
    assert got["vqa_chance"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)  # always "red"


def test_finetune_configs_and_their_pretraining_stage():
    config = ve.get_config("tiny")
    assert config.method.name == "finetune" and config.data.task == "ve" and not config.stages
    chained = rec.get_config("tiny,cookie")
    assert chained.stages.pretrain.output == "init_from"
    stage = finetune_configs.pretraining(chained)
    assert stage.method.name == "cookie" and stage.model.to_dict() == chained.model.to_dict()
    with pytest.raises(ValueError, match="'bert' is not a pre-training method"):
        ve.get_config("tiny,bert")


def test_each_pretraining_layout_loads_its_towers():
    include, exclude, rename = finetune.tower_layout("cookie", "config.init_from=X")
    assert include == (r"(image_tower|text_tower)/.*",) and rename == (r"^(image_tower|text_tower)/=towers/\1/",)
    assert any("mask_embedding" in pattern for pattern in exclude)
    assert r"unified/.*" in finetune.tower_layout("cmal", "f")[0]
    assert any("projection" in p for p in finetune.tower_layout("clip", "f", projections=True)[0])
    assert not any("projection" in p for p in finetune.tower_layout("brivl", "f", projections=True)[0])
    with pytest.raises(ValueError, match="config.init_from=X is a 'vq' run"):
        finetune.tower_layout("vq", "config.init_from=X")


@pytest.mark.parametrize("task", ["ve", "rec"])
def test_only_rec_reads_the_boxes(task):
    """VE and VQA fuse the patch tokens whatever boxes the batch holds (training batches carry the world's boxes,
    evaluation passes none), REC scores exactly the given boxes."""
    import jax
    import jax.numpy as jnp

    config = {"ve": ve, "rec": rec}[task].get_config("tiny")
    config.finetune.fusion.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    model = finetune.FinetuneModel(config.model, config.finetune, task, 3)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    query = jnp.asarray(rng.integers(4, 100, (2, config.model.text.max_len)), jnp.int32)
    boxes = jnp.asarray(np.sort(rng.random((2, 8, 4)), axis=-1)[..., [0, 1, 2, 3]], jnp.float32)
    with_boxes, without = jnp.ones((2, 8), bool), jnp.zeros((2, 8), bool)
    params = model.init(jax.random.PRNGKey(0), images, query, boxes, with_boxes)
    a = model.apply(params, images, query, boxes, with_boxes)
    b = model.apply(params, images, query, boxes, without)
    if task == "ve":
        np.testing.assert_array_equal(a, b)
    else:
        assert np.isfinite(np.asarray(a)).all() and np.isneginf(np.asarray(b)).all()


def test_vqa_answers_of_real_data_are_the_most_frequent_normalised_training_answers(tmp_path):
    from vlp_jax.data import records as record_io

    items = [  # per record: VQA items (answers as annotators gave them)
        [{"question": "what colour", "answers": ["Red", "red", "blue"]}],
        [{"question": "how many", "answers": ["two", "2", "3"]}, {"question": "bad", "answers": []}],
        [{"question": "what colour", "answers": ["the red", "green"]}],
    ]
    shards = [ImageTextRecord(id=str(i), image=png(), captions=["q"], labels={"vqa": v}) for i, v in enumerate(items)]
    record_io.write_records(shards, tmp_path, "train", records_per_shard=8)
    config = vqa.get_config("tiny")
    config.data.train_sources = str(tmp_path)
    config.finetune.max_answers = 2
    # each item counts an answer once: red in 2 items, then blue, 2, 3, green once each (first appearance wins ties)
    assert finetune.answer_vocabulary(config) == ("red", "blue")
    config.finetune.max_answers = 10
    assert finetune.answer_vocabulary(config) == ("red", "blue", "2", "3", "green")
    config.data.train_sources = "synthetic"
    assert "yes" in finetune.answer_vocabulary(config)
