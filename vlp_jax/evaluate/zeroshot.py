"""Zero-shot classification from class names and prompt templates (CLIP-style prompt ensembles).

A class's classifier row is the mean of its prompts' unit-norm text embeddings, renormalised; an image's logits
are its dot products with every row. Accuracy comes from the rank of the true class with pessimistic ties (as in
retrieval.py), so a collapsed model that scores every class equally gets 0% top-1, not 100%.

The core (`prompts`, `class_embeddings`, `zeroshot_accuracy`, `evaluate_zeroshot`) works on any labelled images
(a `ZeroShotTask`); `world_zeroshot_tasks` builds the embedded world's colour and shape tasks.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np

from vlp_jax.data import synthetic
from vlp_jax.data.tokenizer import Tokenizer
from vlp_jax.evaluate.retrieval import Scorer

TOP_KS = (1, 5)
Embed = Callable[[np.ndarray], np.ndarray]  # a batch of images or tokens -> unit-norm embeddings float [n, d]


class ZeroShotTask(NamedTuple):
    """Labelled images and the words to classify them with."""

    name: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int [N], indices into class_names
    class_names: tuple[str, ...]
    templates: tuple[str, ...]  # each holds one "{}" that the class name fills


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: entry c * P + p is template p of class c."""
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"prompt template {template!r} must hold exactly one '{{}}' for the class name")
    return [template.format(name) for name in class_names for template in templates]


def class_embeddings(text_emb: np.ndarray, num_classes: int, num_prompts: int) -> np.ndarray:
    """Classifier float [C, d]: each class's prompt embeddings normalised, averaged, then renormalised.

    text_emb [C * P, d] is class-major, as `prompts` orders the texts.
    """
    text_emb = np.asarray(text_emb, np.float32)
    if text_emb.ndim != 2 or len(text_emb) != num_classes * num_prompts:
        raise ValueError(
            f"text_emb must be [num_classes * num_prompts, d] = [{num_classes * num_prompts}, d], "
            f"got shape {text_emb.shape}"
        )
    unit = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
    mean = unit.reshape(num_classes, num_prompts, -1).mean(axis=1)  # [C, d]
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zeroshot_accuracy(
    image_emb: np.ndarray,
    classifier: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = TOP_KS,
    *,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """Top-k accuracy in percent for each k, keyed "top{k}"; k is clipped to the class count C.

    image_emb [N, d], classifier [C, d], labels int [N] in [0, C). With fewer than k classes every image is a
    top-k hit, so e.g. top5 is 100% when C < 5 (the key keeps the requested k).
    """
    labels = np.asarray(labels)
    num_classes = len(classifier)
    if labels.shape != (len(image_emb),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(image_emb)} integers (one per image), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    ranks = (scorer or Scorer()).ranks(image_emb, classifier, labels, np.arange(num_classes))  # [N] 1-based
    return {f"top{k}": 100.0 * float(np.mean(ranks <= min(k, num_classes))) for k in ks}


def evaluate_zeroshot(
    task: ZeroShotTask,
    embed_images: Embed,
    embed_texts: Embed,
    tokenizer: Tokenizer,
    max_len: int,
    *,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) of the prompt-ensemble classifier on one task."""
    texts = prompts(task.class_names, task.templates)
    classifier = class_embeddings(
        embed_texts(tokenizer.encode(texts, max_len)), len(task.class_names), len(task.templates)
    )
    return zeroshot_accuracy(embed_images(task.images), classifier, task.labels, scorer=scorer)


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
