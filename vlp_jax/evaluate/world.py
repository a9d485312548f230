"""Everything evaluation knows about the embedded world (data/synthetic.py), in one place: whether a run trained
on it, whether an eval set is its eval split in order, its zero-shot colour and shape tasks, and re-rendered views
of its scenes for image→image retrieval."""

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from vlp_jax.data import sources, synthetic
from vlp_jax.data.dataset import PairDataset
from vlp_jax.evaluate.zeroshot import ZeroShotTask


def trained_on_world(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.data.train_sources` include the embedded world."""
    specs = sources.parse_specs(config.data.train_sources, "train", "config.data.train_sources")
    return any(spec.location == sources.SYNTHETIC for spec in specs)


def is_world_eval_split(config: ml_collections.ConfigDict, dataset: PairDataset) -> bool:
    """Whether `dataset` is the world's eval split in order (what re-rendered views must align with)."""
    data = config.data
    if data.eval_sources.strip() != sources.SYNTHETIC:
        return False
    aligned = np.array_equal(synthetic.make_split(data.world, "eval", 1).images[0], dataset.images[0])
    if not aligned:
        logging.warning("the eval set does not start with the world's first eval scene; image→image skipped")
    return aligned


def world_zeroshot_tasks(world: ml_collections.ConfigDict, num: int, split: str = "eval") -> list[ZeroShotTask]:
    """The embedded world's tasks, `num` images each: an object's colour and, separately, its shape.

    single_object_*: scenes of one object (`single_object_world`), a recognition test. leftmost_*: the leftmost
    object of the first `num` scenes of `split`, which also needs left/right understanding. Prompts speak the
    captions' language (only words they use); the attributes that are not the class are ensembled over, one
    template per value, so the classifier averages them out.
    """
    single = synthetic.make_split(single_object_world(world), "eval", num)
    scenes = synthetic.make_split(world, split, num)
    return [
        *_attribute_tasks("single_object", single, world, _SINGLE_OBJECT_CAPTIONS),
        *_attribute_tasks("leftmost", scenes, world, _LEFTMOST_CAPTIONS),
    ]


def single_object_world(world: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`world` with one object per scene and every object kind in the eval split.

    Unless the training world itself has one-object scenes, none of these images was trained on.
    """
    single = world.copy_and_resolve_references()
    single.min_objects = single.max_objects = 1
    single.eval_fraction = 1.0
    return single


# How the world's captions speak of a one-object scene, and of the leftmost object of several.
_SINGLE_OBJECT_CAPTIONS = ("{mention}", "{mention} alone", "only {mention}")
_LEFTMOST_CAPTIONS = ("{mention} on the left", "from left to right {mention}")


def _attribute_tasks(
    prefix: str, split: synthetic.SyntheticSplit, world: ml_collections.ConfigDict, captions: tuple[str, ...]
) -> list[ZeroShotTask]:
    """Colour and shape tasks labelled by each scene's first (leftmost) object."""
    classes = {"colour": tuple(sorted(world.colours.keys())), "shape": tuple(world.shapes)}
    sizes = sorted(world.sizes.keys())
    phrases = {  # an object phrase per value of the other attributes, "{}" where the class goes
        "colour": [f"{size} {{}} {shape}" for size in sizes for shape in classes["shape"]],
        "shape": [f"{size} {colour} {{}}" for size in sizes for colour in classes["colour"]],
    }
    first = [scene.objects[0] for scene in split.scenes]  # objects are ordered left to right
    tasks = []
    for attribute, names in classes.items():
        mentions = [f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}" for phrase in phrases[attribute]]
        templates = tuple(caption.format(mention=mention) for mention in mentions for caption in captions)
        labels = np.array([names.index(getattr(obj, attribute)) for obj in first])
        tasks.append(ZeroShotTask(f"{prefix}_{attribute}", split.images, labels, names, templates))
    return tasks


def world_image_views(
    world: ml_collections.ConfigDict, num: int, max_shift: float, split: str = "eval", *, view: int = 1
) -> np.ndarray:
    """Scenes 0..num-1 of `split` re-rendered: other background noise and a small shift; uint8 [num, H, W, 3].

    Aligned with `synthetic.make_split(world, split, num).images`. The whole scene moves by up to `max_shift` of
    the image side in x and y (config.eval.unimodal.max_shift), clipped so every object stays whole, so left/right
    order and captions stay true. View v (>= 1) draws its noise as the world seeded `world.seed + v` would, and
    its shifts from (seed, v, scene id).
    """
    if view < 1:
        raise ValueError(f"view={view}: view 0 is the original rendering; pick view >= 1")
    view_world = world.copy_and_resolve_references()
    view_world.seed = world.seed + view
    max_pixels = round(max_shift * world.image_size)
    views = []
    for scene in synthetic.generate_scenes(world, split, num):
        rng = np.random.default_rng((world.seed, view, scene.id))
        views.append(synthetic.render(shifted_scene(scene, world.image_size, max_pixels, rng), view_world))
    return np.stack(views)


def shifted_scene(
    scene: synthetic.Scene, image_size: int, max_pixels: int, rng: np.random.Generator
) -> synthetic.Scene:
    """The scene with every box moved by one random (dx, dy) in [-max_pixels, max_pixels], kept in the image."""
    x0, y0, x1, y1 = np.array([obj.box for obj in scene.objects]).T  # [objects] each
    dx = int(rng.integers(max(-max_pixels, -x0.min()), min(max_pixels, image_size - x1.max()) + 1))
    dy = int(rng.integers(max(-max_pixels, -y0.min()), min(max_pixels, image_size - y1.max()) + 1))
    objects = tuple(
        dataclasses.replace(obj, box=(obj.box[0] + dx, obj.box[1] + dy, obj.box[2] + dx, obj.box[3] + dy))
        for obj in scene.objects
    )
    return dataclasses.replace(scene, objects=objects)


TWIN_KINDS = ("shape", "order")


def twin_accuracy(world: ml_collections.ConfigDict, dataset: PairDataset, images: np.ndarray, texts: np.ndarray
                  ) -> dict[str, float]:
    """How often the model tells a scene from its hard-negative twin (synthetic.twin_pairs: one object's shape, or
    the order, changed), Winoground-style, per kind of twin (percent; chance 50): `twins_<kind>_i2t`, each image's
    captions scored above its twin's (every caption pair), and `twins_<kind>_t2i`, each caption's image scored above
    the twin image; `twins_<kind>_pairs` counts the pairs. `dataset` is the world's eval split in order (images
    [N, d] and texts [M, d] its embeddings); {} when its first N scenes hold no twins."""
    pairs = synthetic.twin_pairs(world, "eval", len(dataset))
    owners = np.asarray(dataset.caption_image)
    found = {}
    for kind in TWIN_KINDS:
        i2t, t2i = [], []
        for a, b, pair_kind in pairs:
            if pair_kind != kind:
                continue
            for own, other in ((a, b), (b, a)):
                own_caps, other_caps = texts[owners == own], texts[owners == other]
                own_scores, other_scores = own_caps @ images[own], other_caps @ images[own]
                i2t.append(np.mean(own_scores[:, None] > other_scores[None, :]))
                t2i.extend(own_caps @ images[own] > own_caps @ images[other])
        if i2t:
            found |= {f"twins_{kind}_i2t": 100 * float(np.mean(i2t)), f"twins_{kind}_t2i": 100 * float(np.mean(t2i)),
                      f"twins_{kind}_pairs": float(len(i2t) // 2)}
    return found
