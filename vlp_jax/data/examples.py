"""Records -> model inputs: the transformed image and tokenised caption(s); a bad record becomes a Skipped marker.

These run inside grain (worker processes or read threads), so they never raise for bad data and hold only
picklable state. The reasons a record is skipped are the names in SKIP_REASONS; the pipeline counts them and
training reports them as `data/skipped/<reason>`.
"""

import numpy as np

from vlp_jax.data import records, sources, transforms
from vlp_jax.data.sources import Located, Skipped
from vlp_jax.data.tokenizer import Tokenizer

EMPTY_CAPTION = "empty_caption"  # no caption left after dropping blank ones
SKIP_REASONS = (*sources.READ_REASONS, *records.DECODE_REASONS, *transforms.IMAGE_REASONS, EMPTY_CAPTION)
NOISY_LABEL = "noisy"  # labels key of the ground-truth noisy-pair flag (the embedded world writes it)


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


class TrainExamples:
    """One training example per record: a random resized crop, one random caption, its tokens.

    Called by grain's random_map with a generator seeded by (seed, position in the stream), so every epoch draws
    a fresh crop and caption and a resumed run draws the same ones. ``noisy`` adds the ground-truth flag.
    """

    def __init__(self, image: transforms.ImageOptions, tokenizer: Tokenizer, max_len: int, noisy: bool):
        self.image, self.tokenizer, self.max_len, self.noisy = image, tokenizer, max_len, noisy

    def __call__(self, item: Located | Skipped, rng: np.random.Generator) -> dict[str, np.ndarray] | Skipped:
        prepared = _image_and_captions(item, lambda data: transforms.train_image(data, self.image, rng))
        if isinstance(prepared, Skipped):
            return prepared
        record, image, captions = prepared
        caption = captions[int(rng.integers(len(captions)))]
        example = {"image": image, "text": self.tokenizer.encode([caption], self.max_len)[0]}
        if self.noisy:
            example[NOISY_LABEL] = np.bool_((record.labels or {}).get(NOISY_LABEL, False))
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
