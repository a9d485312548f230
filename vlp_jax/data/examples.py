"""Records -> model inputs: the transformed image and tokenised caption(s); a bad record becomes a Skipped marker.

These run inside grain (worker processes or read threads), so they never raise for bad data and hold only
picklable state. The reasons a record is skipped are the names in SKIP_REASONS; the pipeline counts them and
training reports them as `data/skipped/<reason>`.
"""

import dataclasses

import numpy as np

from vlp_jax.data import records, sources, transforms
from vlp_jax.data.sources import Located, Skipped
from vlp_jax.data.tokenizer import Tokenizer

EMPTY_CAPTION = "empty_caption"  # no caption left after dropping blank ones
SKIP_REASONS = (*sources.READ_REASONS, *records.DECODE_REASONS, *transforms.IMAGE_REASONS, EMPTY_CAPTION)
NOISY_LABEL = "noisy"  # labels key of the ground-truth noisy-pair flag (the embedded world writes it)
IMAGE_TEXT = ("image", "text")  # the features of a two-tower method
DEFAULT_MAX_BOXES = 8  # config.data.max_boxes: the boxes feature's rows


def clean_captions(captions: list[str]) -> list[str]:
    """Captions stripped of surrounding whitespace, blank ones dropped."""
    return [caption.strip() for caption in captions if caption.strip()]


def carries_noisy_flag(source) -> bool:
    """Whether a source's records hold the noisy-pair flag (judged by its first record)."""
    first = source[0] if len(source) else None
    return isinstance(first, Located) and NOISY_LABEL in (first.record.labels or {})


def _no_caption(item: Located) -> Skipped:
    count = len(item.record.captions)
    return Skipped(EMPTY_CAPTION, item.where, item.record.id, f"none of its {count} captions has text")


BOX_KEEP_FRACTION = 0.5  # a box keeps its place in a crop when at least this fraction of its area is inside


@dataclasses.dataclass
class Building:
    """One record on its way to a training example: what the feature builders read and share."""

    record: records.ImageTextRecord
    captions: list[str]
    rng: np.random.Generator
    crop: transforms.Box | None = None  # set by the image builder, in the stored image's pixels


def image_feature(building: Building, options: "TrainExamples") -> dict[str, np.ndarray]:
    """"image": a random resized crop, uint8 [S, S, 3]; raises transforms.ImageError for a bad image."""
    image, building.crop = transforms.train_image_and_crop(building.record.image, options.image, building.rng)
    return {"image": image}


def text_feature(building: Building, options: "TrainExamples") -> dict[str, np.ndarray]:
    """"text": one uniformly chosen caption, int32 [L]."""
    caption = building.captions[int(building.rng.integers(len(building.captions)))]
    return {"text": options.tokenizer.encode([caption], options.max_len)[0]}


def boxes_feature(building: Building, options: "TrainExamples") -> dict[str, np.ndarray]:
    """"boxes" float32 [max_boxes, 4] (x0, y0, x1, y1 in [0, 1] of the output image) and "box_mask" bool
    [max_boxes]: the record's boxes moved into the crop the image builder took (it must come first), clipped;
    boxes with less than BOX_KEEP_FRACTION of their area inside are dropped, the rest padded with zeros."""
    boxes = np.zeros((options.max_boxes, 4), np.float32)
    mask = np.zeros(options.max_boxes, bool)
    saved = building.record.boxes
    if saved is not None and len(saved):
        if building.crop is None:
            raise ValueError("the boxes feature needs the image feature before it (it moves boxes into the crop)")
        x0, y0, x1, y1 = building.crop
        saved = np.asarray(saved, np.float64).reshape(-1, 4)
        inside = np.stack([np.maximum(saved[:, 0], x0), np.maximum(saved[:, 1], y0),
                           np.minimum(saved[:, 2], x1), np.minimum(saved[:, 3], y1)], axis=1)
        area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
        keep = area(inside) >= BOX_KEEP_FRACTION * np.maximum(area(saved), 1e-9)
        kept = (inside[keep] - [x0, y0, x0, y0]) / [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
        kept = kept[: options.max_boxes]
        boxes[: len(kept)] = kept
        mask[: len(kept)] = True
    return {"boxes": boxes, "box_mask": mask}


# One builder per feature a method may declare (Method.features); they run in this order for every record.
FEATURES = {"image": image_feature, "text": text_feature, "boxes": boxes_feature}


def check_features(features) -> tuple[str, ...]:
    """The declared features in building order; an unknown name is an error listing the known ones."""
    unknown = [name for name in features if name not in FEATURES]
    if unknown:
        raise ValueError(f"unknown data feature(s) {', '.join(map(repr, unknown))}; known: {', '.join(FEATURES)}")
    return tuple(name for name in FEATURES if name in features)


class TrainExamples:
    """One training example per record with the declared features (FEATURES), plus the noisy flag when asked.

    Called by grain's random_map with a generator seeded by (seed, position in the stream), so every epoch draws
    a fresh crop and caption and a resumed run draws the same ones.
    """

    def __init__(self, image: transforms.ImageOptions, tokenizer: Tokenizer, max_len: int, noisy: bool,
                 features=IMAGE_TEXT, max_boxes: int = DEFAULT_MAX_BOXES):
        self.image, self.tokenizer, self.max_len, self.noisy = image, tokenizer, max_len, noisy
        self.features, self.max_boxes = check_features(features), max_boxes

    def __call__(self, item: Located | Skipped, rng: np.random.Generator) -> dict[str, np.ndarray] | Skipped:
        if isinstance(item, Skipped):
            return item
        captions = clean_captions(item.record.captions)
        if not captions:
            return _no_caption(item)
        building, example = Building(item.record, captions, rng), {}
        for name in self.features:
            try:
                example.update(FEATURES[name](building, self))
            except transforms.ImageError as error:
                return Skipped(error.reason, item.where, item.record.id, error.message)
        if self.noisy:
            example[NOISY_LABEL] = np.bool_((item.record.labels or {}).get(NOISY_LABEL, False))
        return example


def _image_and_captions(item: Located | Skipped, decode) -> tuple | Skipped:
    """(record, decoded image, usable captions) of a located record, or why it is skipped; `decode(bytes)` raises
    transforms.ImageError for a bad image."""
    if isinstance(item, Skipped):
        return item
    record, captions = item.record, clean_captions(item.record.captions)
    if not captions:
        return _no_caption(item)
    try:
        return record, decode(record.image), captions
    except transforms.ImageError as error:
        return Skipped(error.reason, item.where, record.id, error.message)


class EvalExamples:
    """Every caption of a record with its centre-cropped image: image [S, S, 3], text int32 [k, L], and its group:
    the value of labels[group_label] (images showing the same content, e.g. one emoji in several styles) or None."""

    def __init__(self, image: transforms.ImageOptions, tokenizer: Tokenizer, max_len: int, group_label: str = ""):
        self.image, self.tokenizer, self.max_len, self.group_label = image, tokenizer, max_len, group_label

    def __call__(self, item: Located | Skipped) -> dict | Skipped:
        prepared = _image_and_captions(item, lambda data: transforms.eval_image(data, self.image))
        if isinstance(prepared, Skipped):
            return prepared
        record, image, captions = prepared
        group = (record.labels or {}).get(self.group_label) if self.group_label else None
        return {"image": image, "text": self.tokenizer.encode(captions, self.max_len), "group": group}
