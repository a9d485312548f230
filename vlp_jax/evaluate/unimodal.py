"""Unimodal retrieval (COOKIE's image retrieval and text matching): image→image and text→text recall.

- image→image across views: query i's right answers are the other views of its content (the same scene
  re-rendered with other noise and a small shift in the embedded world; with image groups, any view of any image
  of its group).
- within one set (`same_label_recall`): the first item of every label that has several is a query, every other
  item is the gallery, and a hit is any gallery item with the query's label. Text→text uses it with caption →
  image (or image group) labels: "find another caption of the same image"; image→image uses it with image groups
  when a set carries them (one emoji in several art styles).
Recalls are R@1/5/10 in percent from `retrieval.Scorer.ranks`, so ties count against the model as in image↔text
retrieval.
"""

import dataclasses

import ml_collections
import numpy as np

from vlp_jax.data import synthetic
from vlp_jax.evaluate.retrieval import Scorer, recalls


def cross_view_recall(
    query_emb: np.ndarray, view_emb: np.ndarray, labels: np.ndarray | None = None, *, scorer: Scorer | None = None
) -> dict[str, float]:
    """image→image R@k, keyed "i2i_r{k}": query_emb [N, d] against view_emb [N, d], view i showing query i.

    labels int [N] (image groups, optional) make every view of the query's group a right answer.
    """
    if query_emb.shape != view_emb.shape:
        raise ValueError(
            f"image→image needs one other view per query image, got query {query_emb.shape} and views {view_emb.shape}"
        )
    labels = np.arange(len(query_emb)) if labels is None else np.asarray(labels)
    return recalls("i2i", (scorer or Scorer()).ranks(query_emb, view_emb, labels, labels))


def same_label_recall(
    direction: str, embeddings: np.ndarray, labels: np.ndarray, *, scorer: Scorer | None = None
) -> dict[str, float]:
    """R@k, keyed f"{direction}_r{k}", of finding another item with the query's label: embeddings [n, d], labels [n].

    Queries are the first item of each label with at least two items; the gallery is every other item, so an
    item whose label has no partner is only a distractor.
    """
    labels = np.asarray(labels)
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    queries = first[counts >= 2]  # [Q] item ids
    if not queries.size:
        raise ValueError(f"{direction} retrieval needs a label with at least two items; every label has one")
    gallery = np.setdiff1d(np.arange(len(labels)), queries)  # [G] item ids
    ranks = (scorer or Scorer()).ranks(embeddings[queries], embeddings[gallery], labels[queries], labels[gallery])
    return recalls(direction, ranks)


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
