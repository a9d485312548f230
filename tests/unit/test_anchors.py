"""CMAL anchors: the normalisation map (plurals, synonyms, punctuation, multi-word tags), tag ∩ word anchors with
ambiguous names dropped, the data feature (tokens ↔ words, boxes cut by the crop dropped and counted), the
tag-free detector, and tag-based precision/recall against the embedded world's ground truth."""

import collections
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import examples, synthetic, tokenizer, transforms
from vlp_jax.data.records import ImageTextRecord, Located
from vlp_jax.objectives import anchors

MAX_LEN = 40  # the tiny vocabulary splits words into several pieces
FEATURES = ("image", "text", "boxes", "anchors")


@pytest.fixture(scope="module")
def normalise():
    return anchors.Normaliser.load()


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A tokenizer that splits some words into several pieces (a tiny vocabulary)."""
    texts = synthetic.caption_vocabulary(synthetic.default_config()) + ["balls", "boxes", "two"]
    return tokenizer.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=48)


def test_the_map_normalises_plurals_synonyms_case_and_punctuation(normalise):
    cases = {"circles": "circle", "Balls,": "circle", "boxes": "square", "cube": "square", "ladies": "person",
             "children": "person", "buses": "bus", "glass": "glass", "crosses": "cross", "Dining Table": "table",
             "hot dog": "hot dog", "the": "", "...": ""}
    assert {word: normalise(word) for word in cases} == cases


def test_a_map_given_in_the_config_replaces_the_default(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"synonyms": {"orb": "sphere"}, "plurals": {}, "ignore": []}))
    custom = anchors.Normaliser.load(str(path))
    assert custom("orbs") == "sphere" and custom("ball") == "ball"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="map.json is unreadable"):
        anchors.Normaliser.load(str(path))


def test_tag_anchors_intersect_and_drop_ambiguous_names(normalise):
    tags = ["circle", "square", "circle", "dog"]
    words = "two balls left of a red box and a box".split()
    regions, word_ids = anchors.tag_anchors(tags, words, normalise)
    # 'circle' is two tags, 'square' two words ('box' twice), 'dog' no word: nothing is certain.
    assert regions.tolist() == [0, 0, 0, 0] and word_ids.tolist() == [0] * len(words)
    regions, word_ids = anchors.tag_anchors(["cat", "Boxes", "dog"], "a kitten on a box".split(), normalise)
    assert regions.tolist() == [1, 2, 0] and word_ids.tolist() == [0, 1, 0, 0, 2]


def test_word_alignment_maps_every_piece_to_its_word(word_tokenizer):
    caption = "a large red circle left of two balls"
    words, index = word_tokenizer.word_alignment(caption, MAX_LEN)
    tokens = word_tokenizer.encode([caption], MAX_LEN)[0]
    assert words == caption.split()
    assert index[0] == -1 and (index[tokens == 0] == -1).all() and index[np.argmax(tokens == 3)] == -1
    pieces = tokens[index >= 0]
    assert len(pieces) > len(words)  # some words are several pieces
    assert np.array_equal(np.unique(index[index >= 0]), np.arange(len(words)))
    assert (np.diff(index[index >= 0]) >= 0).all()  # pieces of a word are contiguous, in order
    short_words, short = word_tokenizer.word_alignment(caption, 6)  # BOS + 4 pieces + EOS
    np.testing.assert_array_equal(short[:5], index[:5])
    assert short[5] == -1 and len(short_words) == short[4] + 1  # a cut word keeps the pieces that fit
    assert short_words[:-1] == words[: len(short_words) - 1] and words[short[4]].startswith(short_words[-1])


def record_with(boxes, tags, caption) -> ImageTextRecord:
    encoded = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(encoded, "PNG")
    return ImageTextRecord(id="r", image=encoded.getvalue(), captions=[caption], boxes=np.asarray(boxes, np.float32),
                           tags=tags)


def image_options(crop_scale) -> transforms.ImageOptions:
    return transforms.ImageOptions(size=20, max_pixels=1_000_000, background=(0, 0, 0), crop_scale=crop_scale,
                                   crop_ratio=(1.0, 1.0), crop_tries=10, resample=transforms.RESAMPLING["bilinear"])


def build(record, word_tokenizer, crop_scale, max_boxes=4):
    prepare = examples.TrainExamples(image_options(crop_scale), word_tokenizer, MAX_LEN, noisy=False,
                                     features=FEATURES, max_boxes=max_boxes)
    return prepare(Located(record, "test #0"), np.random.default_rng(0))


def test_the_anchors_feature_marks_tokens_and_kept_boxes(word_tokenizer):
    caption = "a small red square left of two balls"
    record = record_with([[0, 0, 10, 10], [20, 20, 40, 40]], ["ball", "cube"], caption)
    example = build(record, word_tokenizer, crop_scale=(1.0, 1.0))
    assert example["region_tags"].tolist() == [1, 2, 0, 0] and int(example["boxes_dropped"]) == 0
    words, index = word_tokenizer.word_alignment(caption, MAX_LEN)
    np.testing.assert_array_equal(example["token_words"], index)
    anchored = {words[w]: set(example["token_tags"][index == w].tolist()) for w in range(len(words))}
    assert anchored["balls"] == {1} and anchored["square"] == {2}
    assert all(tags == {0} for word, tags in anchored.items() if word not in ("balls", "square"))


def test_a_box_the_crop_cuts_away_is_dropped_counted_and_never_anchored(word_tokenizer):
    caption = "a ball and a box"
    blank = record_with(np.zeros((0, 4)), [], caption)
    _, (x0, y0, x1, y1) = transforms.train_image(blank.image, image_options((0.3, 0.3)), np.random.default_rng(0))
    beside = [x1 + 1, y0, x1 + 4, y0 + 3]  # right of the crop
    inside = [x0 + 1, y0 + 1, x0 + 5, y0 + 5]
    example = build(record_with([beside, inside], ["ball", "cube"], caption), word_tokenizer, (0.3, 0.3))
    assert int(example["boxes_dropped"]) == 1 and example["box_mask"].tolist() == [True, False, False, False]
    width, height = x1 - x0, y1 - y0
    np.testing.assert_allclose(example["boxes"][0], [1 / width, 1 / height, 5 / width, 5 / height], rtol=1e-5)
    assert example["region_tags"].tolist() == [1, 0, 0, 0]  # the kept cube is concept 1, the ball is gone
    words, index = word_tokenizer.word_alignment(caption, MAX_LEN)
    assert set(example["token_tags"][index == words.index("box")].tolist()) == {1}
    assert set(example["token_tags"][index == words.index("ball")].tolist()) == {0}


def test_the_anchors_feature_needs_text_and_boxes():
    with pytest.raises(ValueError, match="'anchors' needs 'boxes'"):
        examples.check_features(("image", "text", "anchors"))


def test_tag_based_anchors_on_the_world_match_its_ground_truth(normalise):
    world = synthetic.default_config()
    quality = anchors.world_anchor_quality(world, "eval", 200, normalise)
    # Every caption names every object; an object is missed exactly when another object shares its shape.
    scenes = synthetic.generate_scenes(world, "eval", 200)
    unique = sum(sum(count == 1 for count in collections.Counter(o.shape for o in s.objects).values())
                 for s in scenes)
    objects = sum(len(s.objects) for s in scenes)
    assert quality["precision"] == 1.0
    assert quality["recall"] == pytest.approx(unique / objects)
    assert quality["pairs"] == objects * world.captions_per_image


def test_tag_free_pairs_are_mutual_nearest_above_the_threshold():
    words = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]])  # [1, L=4, 2]
    regions = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.95, 0.312]]])  # [1, R=3, 2]
    token_valid = jnp.array([[True, True, True, False]])
    region_valid = jnp.array([[True, True, True]])
    pairs = anchors.tag_free_pairs(words, regions, token_valid, region_valid, threshold=0.5)
    want = np.zeros((1, 4, 3), bool)
    want[0, 0, 0] = want[0, 1, 1] = True  # token 2's best region (2) prefers token 0; token 3 is not a word
    np.testing.assert_array_equal(pairs, want)
    assert not anchors.tag_free_pairs(words, regions, token_valid, region_valid, threshold=1.5).any()
    token_tags, region_tags = anchors.tag_free_concepts(pairs)
    assert token_tags.tolist() == [[1, 2, 0, 0]] and region_tags.tolist() == [[1, 2, 0]]
    quality = anchors.pair_precision_recall(pairs, anchors.pair_matrix(jnp.array([[1, 0, 2, 0]]),
                                                                       jnp.array([[1, 2, 0]])))
    assert float(quality["precision"]) == 0.5 and float(quality["recall"]) == 0.5


def test_the_converter_keeps_users_boxes_and_tags_and_coco_instances(tmp_path):
    from vlp_jax.data import records
    from vlp_jax.datasets import convert

    for name, size in (("a.png", (40, 20)), ("b.png", (30, 30))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(tmp_path / name)
    rows = [{"image": "a.png", "caption": "a ball", "boxes": [[0, 0, 10, 10], [20, 4, 40, 20]],
             "tags": ["ball", "cube"]},
            {"image": "a.png", "caption": "two things"},
            {"image": "b.png", "caption": "bad", "boxes": [[5, 5, 1, 1]], "tags": ["x"]}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    _, report = convert.convert(tmp_path / "captions.jsonl", "folder", tmp_path / "out",
                                convert.Options(max_side=20))  # a.png is re-encoded at half size
    (record,) = records.read_split(tmp_path / "out", "train")
    assert record.captions == ["a ball", "two things"] and record.tags == ["ball", "cube"]
    np.testing.assert_allclose(record.boxes, [[0, 0, 5, 5], [10, 2, 20, 10]])
    assert report.skipped == {"bad_row": 1}  # b.png's box has x0 > x1

    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}],
            "annotations": [{"image_id": 7, "caption": "a dog"}, {"image_id": 8, "caption": "empty"}]}
    instances = {"categories": [{"id": 18, "name": "dog"}],
                 "annotations": [{"image_id": 7, "bbox": [2, 3, 10, 5], "category_id": 18}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    convert.convert(tmp_path / "captions.json", "coco", tmp_path / "coco",
                    convert.Options(instances=str(tmp_path / "instances.json")))
    found = {r.id: r for r in records.read_split(tmp_path / "coco", "train")}
    assert found["a.png"].tags == ["dog"] and found["b.png"].tags is None and found["b.png"].boxes is None
    np.testing.assert_allclose(found["a.png"].boxes, [[2, 3, 12, 8]])
