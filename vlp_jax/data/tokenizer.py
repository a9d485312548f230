"""Sentencepiece tokenizer: trained from captions on this machine (never fetched), then BOS + pieces + EOS, padded.

Ids: 0 = pad, 1 = unk, 2 = BOS, 3 = EOS. The text tower pools at the last non-pad token, i.e. EOS.
"""

import io
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Wraps a sentencepiece model file; `encode` returns int32 [n, max_len] ready for the text tower."""

    def __init__(self, model_path: str | epath.Path):
        path = epath.Path(model_path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer model {path} does not exist; set config.data.tokenizer.path to a sentencepiece "
                "model, or leave it empty to train one from the training captions"
            )
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"tokenizer {path} uses pad/bos/eos ids {self._sp.pad_id()}/{self._sp.bos_id()}/"
                f"{self._sp.eos_id()}; vlp_jax needs {PAD_ID}/{BOS_ID}/{EOS_ID} (train it with train_tokenizer)"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Truncates long texts but always keeps EOS last, so EOS pooling sees the whole (truncated) text."""
        tokens = np.full((len(texts), max_len), PAD_ID, np.int32)
        for row, ids in enumerate(self._sp.encode(list(texts))):
            ids = [BOS_ID, *ids[: max_len - 2], EOS_ID]
            tokens[row, : len(ids)] = ids
        return tokens

    def decode(self, tokens: np.ndarray) -> list[str]:
        return [self._sp.decode([int(t) for t in row if t > EOS_ID]) for row in np.atleast_2d(tokens)]


def train_tokenizer(texts: Iterable[str], model_path: str | epath.Path, vocab_size: int) -> Tokenizer:
    """Trains a BPE sentencepiece model on `texts` and writes it to `model_path`.

    `vocab_size` is an upper bound: tiny corpora get fewer pieces rather than an error. Training is
    single-threaded and unshuffled so the same texts give the same model, byte for byte.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = epath.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return Tokenizer(path)
