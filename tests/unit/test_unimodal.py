"""Unimodal retrieval: image→image and text→text recall against brute force, and the world's second views.

The trained tiny model's unimodal recalls are checked in test_suite.py, on the shared trained run.
"""

import numpy as np
import pytest

from tests.helpers import normalised, reference_ranks, tiny_config
from vlp_jax.data import synthetic
from vlp_jax.evaluate import retrieval, unimodal
from vlp_jax.evaluate import world as world_eval

OBJECT_LEVEL = 128  # every world colour has a channel above this; the noisy background never reaches it
MAX_SHIFT = tiny_config().eval.unimodal.max_shift


def reference_recalls(direction, ranks):
    return {f"{direction}_r{k}": 100.0 * np.mean(ranks <= k) for k in (1, 5, 10)}


@pytest.mark.parametrize("seed", range(3))
def test_cross_view_recall_matches_full_sort_reference(seed):
    rng = np.random.default_rng(seed)
    query_emb = normalised(rng.normal(size=(70, 8)))
    view_emb = normalised(query_emb + 0.3 * rng.normal(size=(70, 8)))
    got = unimodal.cross_view_recall(query_emb, view_emb, scorer=retrieval.Scorer(query_chunk=16, gallery_chunk=9))
    want = reference_recalls("i2i", reference_ranks(query_emb, view_emb, np.eye(70, dtype=bool)))
    assert got == pytest.approx(want)
    assert 0 < got["i2i_r1"] < 100


def test_cross_view_hand_built_case_with_a_tie_and_with_groups():
    query_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    view_emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    # Query 0 finds view 0 first; query 1's view ties with view 2 (rank 2); query 2 ties with view 1 (rank 2).
    got = unimodal.cross_view_recall(query_emb, view_emb)
    assert got == pytest.approx({"i2i_r1": 100 / 3, "i2i_r5": 100.0, "i2i_r10": 100.0})
    # Images 1 and 2 show the same content: either of their views is a right answer, so both ties are hits.
    grouped = unimodal.cross_view_recall(query_emb, view_emb, np.array([0, 1, 1]))
    assert grouped["i2i_r1"] == 100.0


@pytest.mark.parametrize("seed", range(3))
def test_same_label_recall_matches_full_sort_reference(seed):
    rng = np.random.default_rng(seed)
    caption_image = rng.permutation(np.repeat(np.arange(40), rng.integers(1, 5, size=40)))  # some have one caption
    image_emb = normalised(rng.normal(size=(40, 8)))
    text_emb = normalised(image_emb[caption_image] + 0.3 * rng.normal(size=(len(caption_image), 8)))
    scorer = retrieval.Scorer(query_chunk=7, gallery_chunk=10)
    got = unimodal.same_label_recall("t2t", text_emb, caption_image, scorer=scorer)
    queries = [np.flatnonzero(caption_image == i)[0] for i in range(40) if np.sum(caption_image == i) >= 2]
    gallery = [t for t in range(len(caption_image)) if t not in queries]
    is_positive = caption_image[queries][:, None] == caption_image[gallery][None, :]
    want = reference_recalls("t2t", reference_ranks(text_emb[queries], text_emb[gallery], is_positive))
    assert got == pytest.approx(want)
    assert 0 < got["t2t_r1"] < 100


def test_same_label_hand_built_case_with_a_tie():
    # Image 0: captions 0 (query) and 2; image 1: captions 1 (query) and 3; image 2: caption 4 (a distractor).
    caption_image = np.array([0, 1, 0, 1, 2])
    text_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0], [0.6, 0.8]])
    # Query 0's positive (caption 2) ties with the distractor: rank 2. Query 1 finds caption 3 first: rank 1.
    got = unimodal.same_label_recall("t2t", text_emb, caption_image)
    assert got == {"t2t_r1": 50.0, "t2t_r5": 100.0, "t2t_r10": 100.0}


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="t2t retrieval needs a label with at least two items"):
        unimodal.same_label_recall("t2t", np.eye(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="one other view per query image"):
        unimodal.cross_view_recall(np.eye(3), np.eye(4)[:, :3])
    with pytest.raises(ValueError, match="view >= 1"):
        world_eval.world_image_views(synthetic.default_config(), 2, MAX_SHIFT, view=0)


def test_world_views_move_each_whole_scene_and_redraw_the_noise():
    world = synthetic.default_config()
    max_pixels = round(MAX_SHIFT * world.image_size)
    originals = synthetic.make_split(world, "eval", 30).images
    views = world_eval.world_image_views(world, 30, MAX_SHIFT)
    assert views.shape == originals.shape and views.dtype == np.uint8
    shifts = []
    for original, view in zip(originals, views, strict=True):
        objects = original.max(axis=-1) > OBJECT_LEVEL  # [H, W]
        view_objects = view.max(axis=-1) > OBJECT_LEVEL
        # Exactly one translation maps every object pixel, colour included, onto the view (a wrapped or cut-off
        # object would break the match).
        matches = [
            (dy, dx)
            for dy in range(-max_pixels, max_pixels + 1)
            for dx in range(-max_pixels, max_pixels + 1)
            if np.array_equal(np.roll(objects, (dy, dx), axis=(0, 1)), view_objects)
            and np.array_equal(np.roll(original, (dy, dx), axis=(0, 1))[view_objects], view[view_objects])
        ]
        assert len(matches) == 1
        shifts.append(matches[0])
        moved_background = np.roll(original, matches[0], axis=(0, 1))[~view_objects]
        assert not np.array_equal(moved_background, view[~view_objects])  # fresh noise, not the old one moved
    assert len(set(shifts)) > 1


def test_shifted_scene_keeps_every_box_inside_and_the_left_to_right_order():
    world = synthetic.default_config()
    rng = np.random.default_rng(0)
    shifts = set()
    for scene in synthetic.generate_scenes(world, "eval", 50):
        moved = world_eval.shifted_scene(scene, world.image_size, max_pixels=world.image_size, rng=rng)
        offsets = {
            (x0 - a0, y0 - b0, x1 - a1, y1 - b1)
            for (a0, b0, a1, b1), (x0, y0, x1, y1) in zip(
                (o.box for o in scene.objects), (o.box for o in moved.objects), strict=True
            )
        }
        assert len(offsets) == 1  # one translation for the whole scene
        dx, dy, dx1, dy1 = offsets.pop()
        assert (dx, dy) == (dx1, dy1)
        shifts.add((dx, dy))
        assert all(0 <= x0 and 0 <= y0 and x1 <= world.image_size and y1 <= world.image_size
                   for x0, y0, x1, y1 in (o.box for o in moved.objects))
        centres = [o.box[0] + o.box[2] for o in moved.objects]
        assert centres == sorted(centres)
        assert [o.phrase for o in moved.objects] == [o.phrase for o in scene.objects]
    assert len(shifts) > 10
