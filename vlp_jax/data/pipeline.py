"""Image-text batches for training and evaluation.

Training draws a fresh permutation of the images each epoch (seeded by (seed, epoch)) and one random caption per
image per epoch; each JAX process takes its own contiguous slice of every global batch. The iterator's position
is a small dict (`get_state`/`set_state`) so a resumed run sees exactly the batches an uninterrupted one would.
Evaluation sees every image once and every caption once.
"""

import dataclasses

import jax
import ml_collections
import numpy as np
from etils import epath

from vlp_jax.data import synthetic
from vlp_jax.data.tokenizer import Tokenizer, train_tokenizer


@dataclasses.dataclass
class PairDataset:
    """Images with their tokenised captions: images uint8 [N, H, W, 3]; captions int32 [M, L] with
    caption_image int [M] naming each caption's image (several captions per image)."""

    images: np.ndarray
    captions: np.ndarray
    caption_image: np.ndarray

    def __post_init__(self):
        counts = np.bincount(self.caption_image, minlength=len(self.images))
        if len(counts) != len(self.images) or (counts == 0).any():
            raise ValueError("every image needs at least one caption and caption_image must index the images")
        order = np.argsort(self.caption_image, kind="stable")
        self._by_image = order  # caption ids grouped by image
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [N] start of each image's group
        self._count = counts  # [N]

    def __len__(self) -> int:
        return len(self.images)

    def pick_captions(self, image_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly chosen caption per image: int32 [b, L]."""
        offsets = (rng.random(len(image_ids)) * self._count[image_ids]).astype(np.int64)
        return self.captions[self._by_image[self._first[image_ids] + offsets]]


class TrainIterator:
    """Endless epochs of this process's slice of each global batch; `get_state` / `set_state` resume exactly."""

    def __init__(
        self, dataset: PairDataset, global_batch: int, seed: int,
        process_index: int | None = None, process_count: int | None = None,
    ):
        self.dataset = dataset
        self.global_batch = global_batch
        self.seed = seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise ValueError(
                f"config.train.batch_size={global_batch} is not divisible by the {self.process_count} processes"
            )
        if global_batch > len(dataset):
            raise ValueError(
                f"config.train.batch_size={global_batch} exceeds the {len(dataset)} training images; "
                "use a smaller batch or more data (config.data.train_size)"
            )
        self.batches_per_epoch = len(dataset) // global_batch  # the incomplete last batch is dropped
        self.epoch, self.index = 0, 0

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.dataset))
        local = self.global_batch // self.process_count
        start = self.index * self.global_batch + self.process_index * local
        image_ids = np.sort(order[start : start + local])  # sorted: cheaper gathers, same set
        caption_rng = np.random.default_rng((self.seed, self.epoch, self.index, self.process_index))
        self.index += 1
        return {"image": self.dataset.images[image_ids], "text": self.dataset.pick_captions(image_ids, caption_rng)}


def load_synthetic(
    config: ml_collections.ConfigDict, workdir: str | epath.Path
) -> tuple[PairDataset, PairDataset, Tokenizer]:
    """Generates the embedded world's train/eval splits and tokenises their captions.

    Without `config.data.tokenizer.path`, a tokenizer is trained on the training captions into the workdir
    (or reused from there if it already exists, so a resumed run tokenises identically).
    """
    world = config.data.world
    train_split = synthetic.make_split(world, "train", config.data.train_size)
    eval_split = synthetic.make_split(world, "eval", config.data.eval_size)
    tokenizer_path = config.data.tokenizer.path
    if tokenizer_path:
        tokenizer = Tokenizer(tokenizer_path)
    else:
        path = epath.Path(workdir) / "tokenizer.model"
        texts = (caption for captions in train_split.captions for caption in captions)
        tokenizer = Tokenizer(path) if path.exists() else train_tokenizer(texts, path, config.data.tokenizer.vocab_size)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but config.model.text.vocab_size is "
            f"{config.model.text.vocab_size}; raise --config.model.text.vocab_size to at least {tokenizer.vocab_size}"
        )
    max_len = config.model.text.max_len

    def to_dataset(split: synthetic.SyntheticSplit) -> PairDataset:
        owners = np.concatenate([np.full(len(c), i) for i, c in enumerate(split.captions)])
        texts = [caption for captions in split.captions for caption in captions]
        return PairDataset(split.images, tokenizer.encode(texts, max_len), owners)

    return to_dataset(train_split), to_dataset(eval_split), tokenizer
