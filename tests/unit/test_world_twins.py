"""The world's hard negatives: scene 2k + 1 as the twin of scene 2k (one object's shape, or only the order,
changed), in the same split, with captions of its own; a training epoch keeps twins adjacent; the twins evaluator's
figures against a hand-made case."""

import grain
import numpy as np
import pytest

from vlp_jax.data import synthetic, train_stream, world_shards
from vlp_jax.data.dataset import PairDataset
from vlp_jax.evaluate import world as world_eval

NUM = 80


def world_with(fraction: float):
    config = synthetic.default_config()
    config.hard_negative_fraction = fraction
    return config


def kinds(scene):
    return [(obj.size, obj.colour, obj.shape) for obj in scene.objects]


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_every_twin_differs_from_its_scene_in_one_shape_or_only_in_order(split):
    world = world_with(1.0)
    scenes = synthetic.generate_scenes(world, split, NUM)
    pairs = synthetic.twin_pairs(world, split, NUM)
    assert len(pairs) >= (0.8 if split == "train" else 0.5) * NUM / 2  # eval twins must hash to eval: fewer
    assert {kind for _, _, kind in pairs} == {"shape", "order"}
    for a, b, kind in pairs:
        base, twin = scenes[a], scenes[b]
        assert synthetic._split_of(kinds(twin), world.eval_fraction) == synthetic.SPLITS.index(split)
        if kind == "shape":
            changed = [j for j, (x, y) in enumerate(zip(kinds(base), kinds(twin), strict=True)) if x != y]
            assert len(changed) == 1 and kinds(base)[changed[0]][:2] == kinds(twin)[changed[0]][:2]
            assert [o.box for o in base.objects] == [o.box for o in twin.objects]
        else:
            assert sorted(kinds(base)) == sorted(kinds(twin)) and kinds(base) != kinds(twin)
        for caption in twin.captions:  # the twin's own captions: every object of it, none that is not
            assert all(obj.phrase in caption for obj in twin.objects)
        assert set(base.captions) != set(twin.captions)


def test_scenes_that_are_not_twins_are_the_ones_drawn_without_twins():
    plain = synthetic.generate_scenes(world_with(0.0), "train", NUM)
    mixed = synthetic.generate_scenes(world_with(0.5), "train", NUM)
    twins = {b for _, b, _ in synthetic.twin_pairs(world_with(0.5), "train", NUM)}
    assert 0.3 * NUM / 2 <= len(twins) <= 0.7 * NUM / 2
    for index, (before, after) in enumerate(zip(plain, mixed, strict=True)):
        assert (before == after) == (index not in twins), index


def test_a_grouped_shuffle_keeps_each_run_adjacent_and_in_order():
    dataset = train_stream.shuffle(grain.MapDataset.range(11), seed=3, group=2)
    epochs = [[dataset[epoch * 11 + i] for i in range(11)] for epoch in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(11))
        i = 0
        while i < len(order):  # runs (2k, 2k + 1) in order; 10 alone (the last, shorter run)
            if order[i] == 10:
                i += 1
                continue
            assert order[i] % 2 == 0 and order[i + 1] == order[i] + 1
            i += 2
    assert epochs[0] != epochs[1]
    source = world_shards.WorldSource(world_with(0.5), "train", 16)
    assert source.shuffle_group == 2 and world_shards.WorldSource(world_with(0.0), "train", 16).shuffle_group == 1


def test_twin_accuracy_against_a_hand_made_case():
    """Two twin pairs; the embeddings tell the first pair apart and confuse the second in one direction."""
    world = world_with(1.0)
    pairs = synthetic.twin_pairs(world, "eval", 40)
    shape = next(p for p in pairs if p[2] == "shape")
    count = shape[1] + 1
    images = np.eye(count, 8 * count)[:, : 2 * count].astype(np.float32)  # image k = unit vector k
    owners = np.repeat(np.arange(count), 2)  # two captions per image
    texts = images[owners].copy()
    a, b = shape[0], shape[1]
    texts[owners == b] = images[a]  # b's captions look like a: i2t of a ties (not above), t2i of b's captions fails
    dataset = PairDataset(np.zeros((count, 1, 1, 3), np.uint8), np.zeros((2 * count, 1), np.int32), owners)
    found = world_eval.twin_accuracy(world, dataset, images, texts)
    shape_pairs = [p for p in pairs if p[2] == "shape" and p[1] < count]
    n = len(shape_pairs)
    assert found["twins_shape_pairs"] == n
    # every other shape pair is told apart both ways. This one: image a scores its captions and b's (copies of a)
    # alike and image b scores both 0, so neither ranks its own above (i2t 0 of 2); a's captions pick a, b's pick a
    # too (t2i 2 of 4)
    assert found["twins_shape_i2t"] == pytest.approx(100 * (n - 1) / n)
    assert found["twins_shape_t2i"] == pytest.approx(100 * (n - 0.5) / n)
