"""Tokenizer and the in-memory training iterator: whole-word pieces, no truncation of world captions, exact resume,
process slices, JSON state."""

import numpy as np
import pytest

from configs import clip
from vlp_jax.data import synthetic
from vlp_jax.data.dataset import PairDataset
from vlp_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer
from vlp_jax.data.train_stream import TrainIterator


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    world = synthetic.default_config()
    train = synthetic.make_split(world, "train", 500)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer((c for cs in train.captions for c in cs), path, vocab_size=128)


def test_world_captions_fit_the_tiny_text_tower_untruncated(world_tokenizer):
    config = clip.get_config("tiny")
    captions = [c for cs in synthetic.make_split(config.data.world, "eval", 200).captions for c in cs]
    tokens = world_tokenizer.encode(captions, config.model.text.max_len)
    assert world_tokenizer.vocab_size <= config.model.text.vocab_size
    assert world_tokenizer.decode(tokens) == captions  # nothing was cut off
    lengths = (tokens != PAD_ID).sum(axis=1)
    assert (tokens[:, 0] == BOS_ID).all() and (tokens[np.arange(len(tokens)), lengths - 1] == EOS_ID).all()


def test_every_world_word_is_one_piece(world_tokenizer):
    for word in ("large", "purple", "diamond", "right"):
        assert len(world_tokenizer.encode([word], 8)[0].nonzero()[0]) == 3  # BOS, the word, EOS


def test_truncation_keeps_eos_last(world_tokenizer):
    tokens = world_tokenizer.encode(["a large red circle left of a small blue square"], 5)
    assert tokens.tolist() == [[BOS_ID, *tokens[0, 1:4].tolist(), EOS_ID]]


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = ["a small red circle", "a large blue square left of a small red circle"] * 50
    a = train_tokenizer(texts, tmp_path / "a.model", 64)
    b = train_tokenizer(texts, tmp_path / "b.model", 64)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_missing_tokenizer_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.data.tokenizer.path"):
        Tokenizer(tmp_path / "missing.model")


def toy_dataset(n=40, captions_per_image=3):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    owners = np.repeat(np.arange(n), captions_per_image)
    captions = np.stack([owners, np.tile(np.arange(captions_per_image), n)], axis=1).astype(np.int32)  # [M, 2]
    return PairDataset(images, captions, owners)


def test_restored_iterator_yields_the_same_batches():
    dataset = toy_dataset()
    uninterrupted = TrainIterator(dataset, 8, seed=3)
    reference = [next(uninterrupted) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    interrupted = TrainIterator(dataset, 8, seed=3)
    for _ in range(7):
        next(interrupted)
    resumed = TrainIterator(dataset, 8, seed=3)
    resumed.set_state(interrupted.get_state())
    for want in reference[7:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])


def test_processes_read_disjoint_slices_covering_each_epoch_once():
    dataset = toy_dataset()
    per_process = [TrainIterator(dataset, 8, seed=0, process_index=i, process_count=2) for i in range(2)]
    seen = [int(image[0, 0, 0]) for it in per_process for _ in range(5) for image in next(it)["image"]]
    assert sorted(seen) == list(range(40))
    for batch in (next(it) for it in per_process):  # each image's caption belongs to it
        assert (batch["text"][:, 0] == batch["image"][:, 0, 0, 0]).all()


def test_batch_larger_than_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size=64 exceeds the 40 training images"):
        TrainIterator(toy_dataset(), 64, seed=0)


def test_image_groups_must_name_every_image():
    dataset = toy_dataset(n=4)
    grouped = PairDataset(dataset.images, dataset.captions, dataset.caption_image, np.array([0, 0, 1, 1]))
    assert grouped.image_groups.tolist() == [0, 0, 1, 1] and dataset.image_groups is None
    with pytest.raises(ValueError, match="image_groups has 3 entries for 4 images"):
        PairDataset(dataset.images, dataset.captions, dataset.caption_image, np.array([0, 0, 1]))


def test_in_memory_iterator_state_is_json_and_counts_batches():
    batches = TrainIterator(toy_dataset(), 8, seed=0)
    for _ in range(7):
        next(batches)
    state = batches.get_state()
    assert state == {"next_index": {"0": 56}, "batches": 7, "skipped": {}}
    assert (batches.epoch, batches.index, batches.batches_per_epoch) == (1, 2, 5)
    with pytest.raises(ValueError, match="was not saved by vlp_jax.data.pipeline.TrainIterator"):
        batches.set_state({"epoch": 1, "index": 2})
