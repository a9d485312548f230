"""The embedded world: deterministic, split by content, captions true of their images, scenes identifiable."""

import collections
import re

import numpy as np
import pytest

from vlp_jax.data import synthetic

# Everything a caption may say between object mentions.
CONNECTORS = {"", "left of", "to the right of", "then", "and", "alone", "only", "from left to right",
              "from right to left"}


@pytest.fixture(scope="module")
def world():
    return synthetic.default_config()


@pytest.fixture(scope="module")
def eval_split(world):
    return synthetic.make_split(world, "eval", 1000)


def varied_world():
    """One to three objects per scene, so every caption template shape is exercised."""
    world = synthetic.default_config()
    world.min_objects, world.max_objects = 1, 3
    return world


def centre_x(obj):
    return (obj.box[0] + obj.box[2]) / 2


def signature(scene):
    """What a caption must pin down: each object's size, colour and shape, from left to right."""
    return tuple((o.size, o.colour, o.shape) for o in sorted(scene.objects, key=centre_x))


def claimed_left_to_right(caption, world):
    """The (size, colour, shape) mentions a caption states, read back in its claimed left-to-right order."""
    names = [sorted(world.sizes.keys()), sorted(world.colours.keys()), world.shapes]
    mention = re.compile(r"\b(?:a|an) ({}) ({}) ({})( on the left| in the middle| on the right)?".format(
        *("|".join(group) for group in names)))
    found = [(m.group(1, 2, 3), m.group(4)) for m in mention.finditer(caption)]
    connectors = {piece.strip() for piece in mention.sub("|", caption).split("|")}
    assert connectors <= CONNECTORS, caption
    mentions = [kind for kind, _ in found]
    places = [place for _, place in found]
    if any(places):
        assert all(places), caption
        rank = {" on the left": 0, " in the middle": 1, " on the right": 2}
        return [kind for _, kind in sorted(zip((rank[p] for p in places), mentions, strict=True))]
    rightwards = "left of" in caption or caption.startswith("from left to right")
    leftwards = "right of" in caption or caption.startswith("from right to left")
    assert not (rightwards and leftwards), caption
    return mentions[::-1] if leftwards else mentions


def test_same_config_gives_identical_output(world):
    first, second = synthetic.make_split(world, "train", 64), synthetic.make_split(world, "train", 64)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.captions == second.captions
    np.testing.assert_array_equal(first.ids, second.ids)


def test_scene_does_not_depend_on_how_many_are_generated(world):
    few, many = synthetic.generate_scenes(world, "train", 10), synthetic.generate_scenes(world, "train", 100)
    assert few == many[:10]
    images = synthetic.make_split(world, "train", 100).images
    np.testing.assert_array_equal(synthetic.render(few[7], world), images[7])


def test_seed_changes_the_scenes(world):
    other = world.copy_and_resolve_references()
    other.seed = world.seed + 1
    assert synthetic.generate_scenes(world, "train", 20) != synthetic.generate_scenes(other, "train", 20)


def test_train_and_eval_are_disjoint_by_content(world, eval_split):
    train = synthetic.make_split(world, "train", 5000)
    assert not {signature(s) for s in train.scenes} & {signature(s) for s in eval_split.scenes}
    assert not set(train.ids.tolist()) & set(eval_split.ids.tolist())
    assert len(set(train.ids.tolist())) == len(train.ids)


def test_unknown_split_is_rejected_by_name(world):
    with pytest.raises(ValueError, match="validation"):
        synthetic.generate_scenes(world, "validation", 1)


def test_unknown_shape_is_rejected_by_name():
    world = synthetic.default_config()
    world.shapes = ("circle", "hexagon")
    with pytest.raises(ValueError, match="hexagon"):
        synthetic.generate_scenes(world, "train", 1)


@pytest.mark.parametrize("make_world", [synthetic.default_config, varied_world])
def test_every_caption_is_true_of_its_scene(make_world):
    world = make_world()
    scenes = synthetic.generate_scenes(world, "train", 300)
    counts = collections.Counter(len(s.objects) for s in scenes)
    assert set(counts) == set(range(world.min_objects, world.max_objects + 1))
    for scene in scenes:
        assert len(scene.captions) == world.captions_per_image
        assert len(set(scene.captions)) >= 3  # several wordings of the same facts
        truth = list(signature(scene))
        for caption in scene.captions:
            assert claimed_left_to_right(caption, world) == truth, (caption, scene.objects)


def test_captions_use_lower_case_words_from_the_vocabulary():
    world = varied_world()
    vocabulary = set(synthetic.caption_vocabulary(world))
    captions = [c for s in synthetic.generate_scenes(world, "eval", 200) for c in s.captions]
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", c) for c in captions)
    used = {word for c in captions for word in c.split()}
    assert used <= vocabulary
    assert vocabulary - used <= {"an"}  # no size name starts with a vowel in the default world


def test_boxes_fit_apart_and_ordered_left_to_right(world, eval_split):
    size, gap = world.image_size, round(world.box_gap * world.image_size)
    for scene in eval_split.scenes:
        objects = scene.objects
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert x1 - x0 == y1 - y0 == round(world.sizes[obj.size] * size)
        centres = [centre_x(o) for o in objects]
        assert np.all(np.diff(centres) >= world.min_centre_gap * size), centres
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
                assert ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def test_pixels_show_each_object_in_its_colour_and_nothing_outside_boxes(world, eval_split):
    background = np.asarray(world.background)
    for image, scene in zip(eval_split.images[:300], eval_split.scenes[:300], strict=True):
        outside = np.ones(image.shape[:2], bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            patch = image[y0:y1, x0:x1]
            is_colour = np.all(patch == world.colours[obj.colour], axis=-1)
            assert is_colour[(y1 - y0) // 2, (x1 - x0) // 2], obj  # every shape covers its box centre
            assert is_colour.mean() >= 0.4, obj
            outside[y0:y1, x0:x1] = False
        assert np.abs(image[outside].astype(int) - background).max() <= 8 * world.background_noise


def test_split_arrays_have_the_promised_shapes(eval_split, world):
    n = len(eval_split.scenes)
    assert eval_split.images.shape == (n, world.image_size, world.image_size, 3)
    assert eval_split.images.dtype == np.uint8 and eval_split.ids.dtype == np.int64
    assert eval_split.ids.tolist() == [s.id for s in eval_split.scenes]
    assert eval_split.captions == [list(s.captions) for s in eval_split.scenes]


def test_objects_scale_with_image_size():
    world = synthetic.default_config()
    world.image_size = 64
    split = synthetic.make_split(world, "train", 20)
    assert split.images.shape == (20, 64, 64, 3)
    sides = {o.size: o.box[2] - o.box[0] for s in split.scenes for o in s.objects}
    assert sides == {"small": 16, "large": 29}


def test_eval_scenes_are_identified_by_their_captions(eval_split):
    caption_sets = collections.Counter(frozenset(s.captions) for s in eval_split.scenes)
    signatures = collections.Counter(signature(s) for s in eval_split.scenes)
    unique_sets = sum(caption_sets[frozenset(s.captions)] == 1 for s in eval_split.scenes)
    unique_contents = sum(signatures[signature(s)] == 1 for s in eval_split.scenes)
    assert unique_sets >= 950 and unique_contents >= 950, (unique_sets, unique_contents)
