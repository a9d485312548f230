"""Method-declared features: one builder per feature; boxes follow the random crop into the output image; the
image and text of a batch do not change when boxes are declared; unknown features are clear errors."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny_config
from vlp_jax.data import examples, pipeline, synthetic, tokenizer, transforms
from vlp_jax.data.records import ImageTextRecord, Located

MAX_LEN = 12
FEATURES = ("image", "text", "boxes")


@pytest.fixture(scope="module")
def world():
    """A world of 48 px scenes (three objects each) and its first training records."""
    config = synthetic.default_config()
    config.image_size = 48
    return config, list(synthetic.split_records(config, "train", 6))


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory, world):
    config, _ = world
    return tokenizer.train_tokenizer(synthetic.caption_vocabulary(config), tmp_path_factory.mktemp("tok") / "t.model",
                                     vocab_size=64)


def image_options(size: int = 32, crop_scale=(0.3, 0.6), crop_ratio=(3 / 4, 4 / 3)) -> transforms.ImageOptions:
    return transforms.ImageOptions(size=size, max_pixels=1_000_000, background=(255, 255, 255),
                                   crop_scale=crop_scale, crop_ratio=crop_ratio, crop_tries=10,
                                   resample=transforms.RESAMPLING["bilinear"])


def build(record, options, word_tokenizer, seed, max_boxes=8, features=FEATURES) -> dict:
    prepare = examples.TrainExamples(options, word_tokenizer, MAX_LEN, noisy=False, features=features,
                                     max_boxes=max_boxes)
    return prepare(Located(record, "test #0"), np.random.default_rng(seed))


def expected_boxes(saved: np.ndarray, crop) -> list[list[float]]:
    """The boxes feature by hand: each box clipped to the crop, kept when at least half its area is inside,
    in the crop's coordinates divided by its size."""
    cx0, cy0, cx1, cy1 = crop
    kept = []
    for x0, y0, x1, y1 in saved.tolist():
        ix0, iy0, ix1, iy1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        inside = max(ix1 - ix0, 0) * max(iy1 - iy0, 0)
        if inside > 0 and inside >= 0.5 * (x1 - x0) * (y1 - y0):
            kept.append([(ix0 - cx0) / (cx1 - cx0), (iy0 - cy0) / (cy1 - cy0),
                         (ix1 - cx0) / (cx1 - cx0), (iy1 - cy0) / (cy1 - cy0)])
    return kept


def test_a_whole_image_crop_gives_the_records_boxes_over_the_image_size(world, world_tokenizer):
    _, world_records = world
    options = image_options(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    for seed, record in enumerate(world_records):
        example = build(record, options, world_tokenizer, seed)
        assert example["boxes"].dtype == np.float32 and example["boxes"].shape == (8, 4)
        assert example["box_mask"].dtype == bool and example["box_mask"].tolist() == [True] * 3 + [False] * 5
        np.testing.assert_allclose(example["boxes"][:3], record.boxes / 48, rtol=1e-6)
        assert not example["boxes"][3:].any()
    two = build(world_records[0], options, world_tokenizer, 0, max_boxes=2)
    np.testing.assert_allclose(two["boxes"], world_records[0].boxes[:2] / 48, rtol=1e-6)


def test_boxes_move_with_a_random_crop_and_boxes_cut_away_are_dropped(world, world_tokenizer):
    _, world_records = world
    options = image_options()
    dropped = 0
    for seed, record in enumerate(world_records):
        example = build(record, options, world_tokenizer, seed)
        image, crop = transforms.train_image(record.image, options, np.random.default_rng(seed))  # the same draws
        decoded = transforms.decode_image(record.image, options.max_pixels, options.background)
        np.testing.assert_array_equal(example["image"], image)
        np.testing.assert_array_equal(image, transforms.crop_resize(decoded, crop, options))  # crop = pixels shown
        want = expected_boxes(record.boxes, crop)
        assert example["box_mask"].tolist() == [True] * len(want) + [False] * (8 - len(want))
        np.testing.assert_allclose(example["boxes"][: len(want)], np.reshape(want, (-1, 4)), rtol=1e-6, atol=1e-7)
        assert (example["boxes"] >= 0).all() and (example["boxes"] <= 1).all()
        dropped += len(record.boxes) - len(want)
    assert dropped > 0  # some crop cut a box away

    # A box beside the crop, one mostly outside it and one inside, on a record of our own.
    record = world_records[0]
    _, (x0, y0, x1, y1) = transforms.train_image(record.image, options, np.random.default_rng(7))
    width = x1 - x0
    beside = [x1 + 1, y0, x1 + 3, y0 + 2]  # right of the crop (boxes may reach past the image too)
    mostly_out = [x0 - 0.8 * width, y0, x0 + 0.2 * width, y1]
    inside = [x0 + 1, y0 + 1, x0 + 4, y0 + 5]
    custom = ImageTextRecord("custom", record.image, ["a caption"], boxes=np.array([beside, mostly_out, inside],
                                                                                  np.float32))
    example = build(custom, options, world_tokenizer, 7)
    assert example["box_mask"].tolist() == [True] + [False] * 7
    np.testing.assert_allclose(example["boxes"][0], [1 / width, 1 / (y1 - y0), 4 / width, 5 / (y1 - y0)], rtol=1e-6)


def test_a_reduced_scale_jpeg_crop_is_the_whole_pixels_taken(world_tokenizer):
    yy, xx = np.mgrid[0:512, 0:512]
    encoded = io.BytesIO()
    Image.fromarray(np.stack([xx // 2, yy // 2, 255 - xx // 2], axis=-1).astype(np.uint8)).save(encoded, "JPEG")
    options = image_options(size=16)  # every crop of 0.3 to 0.6 of 512 x 512 is decoded at 1/8
    for seed in range(5):
        drawn = transforms.random_crop_box(512, 512, options, np.random.default_rng(seed))
        _, crop = transforms.train_image(encoded.getvalue(), options, np.random.default_rng(seed))
        assert all(value % 8 == 0 for value in crop)  # decoded at 1/8: whole pixels there
        assert np.abs(np.subtract(crop, drawn)).max() <= 4


def test_records_without_boxes_give_empty_masks(world, world_tokenizer):
    _, world_records = world
    plain = ImageTextRecord("plain", world_records[0].image, ["a caption"])
    example = build(plain, image_options(), world_tokenizer, 0, max_boxes=4)
    assert example["box_mask"].tolist() == [False] * 4 and not example["boxes"].any()


def test_declaring_boxes_leaves_the_image_and_text_of_every_batch_unchanged(tmp_path):
    config = tiny_config(batch_size=8)
    config.data.train_size, config.data.eval_size = 32, 8
    config.data.world_dir = str(tmp_path / "worlds")
    plain = pipeline.load(config, tmp_path)
    boxed = pipeline.load(config, tmp_path, features=("boxes", "text", "image"))  # built in FEATURES order
    for _ in range(5):
        want, got = next(plain.train), next(boxed.train)
        assert set(want) == {"image", "text"} and set(got) == {"image", "text", "boxes", "box_mask"}
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])
        assert got["boxes"].shape == (8, config.data.max_boxes, 4) and got["boxes"].dtype == np.float32
        assert got["box_mask"].dtype == bool and got["box_mask"].sum() >= 8  # most of 3 objects per scene stay


def test_unknown_features_are_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data feature\(s\) 'depth'; known: image, text, boxes"):
        pipeline.load(tiny_config(), tmp_path, features=("image", "depth"))
    with pytest.raises(ValueError, match="data feature 'boxes' needs 'image' declared too"):
        examples.check_features(("text", "boxes"))


def test_second_views_are_another_crop_and_another_caption_and_leave_the_first_views_as_they_were(
        world, world_tokenizer):
    _, world_records = world
    options = image_options()
    views = ("image", "text", "image_view", "text_view")
    assert examples.check_features(("text_view", "image_view", "text", "image")) == views
    with pytest.raises(ValueError, match="'text_view' needs 'text'"):
        examples.check_features(("image", "text_view"))
    for seed, record in enumerate(world_records):
        example = build(record, options, world_tokenizer, seed, features=views)
        plain = build(record, options, world_tokenizer, seed, features=("image", "text"))
        np.testing.assert_array_equal(example["image"], plain["image"])  # drawn first: unchanged by the views
        np.testing.assert_array_equal(example["text"], plain["text"])
        # The second crop: what train_image draws next from the same generator.
        rng = np.random.default_rng(seed)
        transforms.train_image(record.image, options, rng)
        caption_draw = int(rng.integers(len(record.captions)))
        second, _ = transforms.train_image(record.image, options, rng)
        np.testing.assert_array_equal(example["image_view"], second)
        assert not np.array_equal(example["image_view"], example["image"])
        # Another caption of the same record, never the student's when it has others.
        chosen = record.captions[caption_draw]
        others = [c for c in record.captions if c != chosen]
        assert len(others) >= 1
        assert world_tokenizer.decode(example["text_view"])[0] in [world_tokenizer.decode(
            world_tokenizer.encode([c], MAX_LEN))[0] for c in others]
    one = ImageTextRecord(image=world_records[0].image, captions=["only one"], id="one")
    single = build(one, options, world_tokenizer, 0, features=views)
    np.testing.assert_array_equal(single["text_view"], single["text"])  # no other caption: the same one
