"""The evaluation set in memory: every image once with all its captions (and, optionally, image groups)."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class PairDataset:
    """Images with their tokenised captions: images uint8 [N, H, W, 3]; captions int32 [M, L] with
    caption_image int [M] naming each caption's image (several captions per image). ``image_groups`` (int [N])
    gives images showing the same content the same number (e.g. one emoji in several art styles), or is None.
    ``source_records`` is the number of records in the sources it was read from (0 when not read from sources):
    more than its images when reading stopped early or skipped records."""

    images: np.ndarray
    captions: np.ndarray
    caption_image: np.ndarray
    image_groups: np.ndarray | None = None
    source_records: int = 0

    def __post_init__(self):
        counts = np.bincount(self.caption_image, minlength=len(self.images))
        if len(counts) != len(self.images) or (counts == 0).any():
            raise ValueError("every image needs at least one caption and caption_image must index the images")
        if self.image_groups is not None and len(self.image_groups) != len(self.images):
            raise ValueError(f"image_groups has {len(self.image_groups)} entries for {len(self.images)} images")
        order = np.argsort(self.caption_image, kind="stable")
        self._by_image = order  # caption ids grouped by image
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [N] start of each image's group
        self._count = counts  # [N]

    def __len__(self) -> int:
        return len(self.images)

    def first_images(self, num_images: int) -> "PairDataset":
        """The first `num_images` images with all their captions (and groups); the whole set when 0 or larger."""
        if num_images <= 0 or num_images >= len(self):
            return self
        keep = self.caption_image < num_images
        return dataclasses.replace(
            self,
            images=self.images[:num_images],
            captions=self.captions[keep],
            caption_image=self.caption_image[keep],
            image_groups=None if self.image_groups is None else self.image_groups[:num_images],
        )

    def pick_captions(self, image_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly chosen caption per image: int32 [b, L]."""
        offsets = (rng.random(len(image_ids)) * self._count[image_ids]).astype(np.int64)
        return self.captions[self._by_image[self._first[image_ids] + offsets]]
