"""Zero-shot classification from class names and prompt templates (CLIP-style prompt ensembles).

A class's classifier row is the mean of its prompts' unit-norm text embeddings, renormalised; an image's logits
are its dot products with every row. Accuracy comes from the rank of the true class with pessimistic ties (as in
retrieval.py), so a collapsed model that scores every class equally gets 0% top-1, not 100%.

The core (`prompts`, `class_embeddings`, `zeroshot_accuracy`, `evaluate_zeroshot`) works on any labelled images
(a `ZeroShotTask`); evaluate/world.py builds the embedded world's colour and shape tasks.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

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
