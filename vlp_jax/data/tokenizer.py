"""Sentencepiece tokenizer: trained from captions on this machine (never fetched), then BOS + pieces + EOS, padded.

Ids: 0 = pad, 1 = unk, 2 = BOS, 3 = EOS. The text tower pools at the last non-pad token, i.e. EOS.

Train one from a dataset's captions, then point the config at it (config.data.tokenizer.path):

    python -m vlp_jax.data.tokenizer train --shards=DIR_OR_GLOB --vocab-size=N --out=PATH
        [--split=train] [--max-captions=N]

--shards takes anything config.data.train_sources takes (a dataset directory, a glob of ArrayRecord files,
tfds:NAME, several separated by commas).
"""

import argparse
import io
import sys
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def check_model(model_path: str | epath.Path) -> epath.Path:
    """The model file's path; FileNotFoundError naming config.data.tokenizer.path when it does not exist."""
    path = epath.Path(model_path)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer model {path} does not exist; set config.data.tokenizer.path to a sentencepiece "
            "model (or CLIP's BPE vocabulary with config.data.tokenizer.kind='clip_bpe'), or leave it empty to "
            "train one from the training captions"
        )
    return path


class Tokenizer:
    """Wraps a sentencepiece model file; `encode` returns int32 [n, max_len] ready for the text tower."""

    def __init__(self, model_path: str | epath.Path):
        path = check_model(model_path)
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"tokenizer {path} uses pad/bos/eos ids {self._sp.pad_id()}/{self._sp.bos_id()}/"
                f"{self._sp.eos_id()}; vlp_jax needs {PAD_ID}/{BOS_ID}/{EOS_ID} (train it with train_tokenizer)"
            )

    def __getstate__(self) -> dict:
        """Pickles as the model bytes (grain worker processes get a copy, not a path that may be elsewhere)."""
        return {"path": str(self.path), "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state: dict) -> None:
        self.path = epath.Path(state["path"])
        self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Truncates long texts but always keeps EOS last, so EOS pooling sees the whole (truncated) text."""
        tokens = np.full((len(texts), max_len), PAD_ID, np.int32)
        for row, text in enumerate(texts):  # one string at a time: sentencepiece's batch call costs ~20x more
            ids = [BOS_ID, *self._sp.encode(text)[: max_len - 2], EOS_ID]
            tokens[row, : len(ids)] = ids
        return tokens

    def word_alignment(self, text: str, max_len: int) -> tuple[list[str], np.ndarray]:
        """The words of `text` as sentencepiece splits it (a piece starting with '▁' starts a word) and, for each
        of the max_len positions `encode` fills, the index of the word its token belongs to: int32 [max_len],
        -1 at BOS, EOS and padding. Truncation cuts words as `encode` does: the last word keeps the pieces that fit."""
        pieces = self._sp.encode(text, out_type=str)[: max_len - 2]
        words: list[str] = []
        index = np.full(max_len, -1, np.int32)
        for position, piece in enumerate(pieces, start=1):  # position 0 is BOS
            if piece.startswith("▁") or not words:
                words.append("")
            words[-1] += piece.lstrip("▁")
            index[position] = len(words) - 1
        return words, index

    def decode(self, tokens: np.ndarray) -> list[str]:
        return [self._sp.decode([int(t) for t in row if t > EOS_ID]) for row in np.atleast_2d(tokens)]


KINDS = ("sentencepiece", "clip_bpe")  # config.data.tokenizer.kind


def open_tokenizer(settings) -> "Tokenizer":
    """The tokenizer `config.data.tokenizer` names: kind "sentencepiece" (ours, `path` a model file) or "clip_bpe"
    (CLIP's byte-level BPE for imported CLIP weights, `path` its vocabulary file, e.g. bpe_simple_vocab_16e6.txt.gz)."""
    kind = settings.get("kind", "sentencepiece")
    if kind not in KINDS:
        raise ValueError(f"config.data.tokenizer.kind={kind!r}; use one of {', '.join(KINDS)}")
    if kind == "clip_bpe":
        from vlp_jax.data.clip_bpe import ClipTokenizer

        if not settings.path:
            raise ValueError("config.data.tokenizer.kind='clip_bpe' needs config.data.tokenizer.path: CLIP's BPE "
                             "vocabulary file (bpe_simple_vocab_16e6.txt.gz, shipped with open_clip)")
        return ClipTokenizer(str(check_model(settings.path)))
    return Tokenizer(settings.path)


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
    # Written aside then renamed: processes sharing a workdir each train the same model, and none may read a
    # half-written file.
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    partial.write_bytes(model.getvalue())
    partial.rename(path)
    return Tokenizer(path)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlp_jax.data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a BPE model on the captions of ArrayRecord shards")
    train.add_argument("--shards", required=True, help="dataset directory, glob, or tfds:NAME (comma-separated)")
    train.add_argument("--vocab-size", type=int, required=True, help="upper bound on the number of pieces")
    train.add_argument("--out", required=True, help="where to write the sentencepiece model file")
    train.add_argument("--split", default="train", help="split of dataset directories to read (default: train)")
    train.add_argument("--max-captions", type=int, default=0, help="read at most this many captions (0 = all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from vlp_jax.data import sources  # the shard readers are needed only by this command

    try:
        opened = [sources.open_source(spec, "--shards") for spec in sources.parse_specs(args.shards, args.split,
                                                                                          "--shards")]
        texts = list(sources.source_captions(opened, args.max_captions))
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not texts:
        print(f"error: --shards={args.shards} holds no readable caption", file=sys.stderr)
        return 2
    tokenizer = train_tokenizer(texts, args.out, args.vocab_size)
    print(f"trained {tokenizer.vocab_size} pieces on {len(texts):,} captions -> {tokenizer.path}")
    print(f"use it with --config.data.tokenizer.path={tokenizer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
