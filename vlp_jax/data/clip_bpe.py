"""CLIP's byte-level BPE tokenizer, read from a vocabulary file the user points to (OpenAI's
bpe_simple_vocab_16e6.txt.gz, shipped with open_clip; never fetched), for imported CLIP weights.

Ids are CLIP's + 1, so 0 stays our padding (CLIP's id 0 is "!"; vlp_jax/weights/openclip.py shifts the token table
to match). Cleaning is CLIP's (HTML entities twice, whitespace collapsed, lower case) without ftfy's repair of
mis-decoded text: identical on well-formed text.
"""

import gzip
import html
import unicodedata
from collections.abc import Sequence

import numpy as np

KIND = "clip_bpe"  # config.data.tokenizer.kind that selects this tokenizer (path = the vocabulary file)
SPECIALS = ("<start_of_text>", "<end_of_text>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
MAX_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, the same ending a word, merges, 2 specials


def byte_symbols() -> list[str]:
    """A printable character per byte, in CLIP's order: bytes that print as themselves first (by value), then the
    others, mapped to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))], printable + others


def _kind(char: str) -> str:
    if char.isspace():
        return "space"
    return {"L": "letter", "N": "number"}.get(unicodedata.category(char)[0], "other")


def pieces(text: str) -> list[str]:
    """CLIP's pre-tokenisation: specials, contractions, runs of letters, single digits, runs of other symbols;
    whitespace separates."""
    out, i = [], 0
    while i < len(text):
        match = next((p for p in SPECIALS + CONTRACTIONS if text.startswith(p, i)), None)
        kind = _kind(text[i])
        if match:
            end = i + len(match)
        elif kind == "space":
            i += 1
            continue
        elif kind == "number":
            end = i + 1
        else:  # a run of letters, or of symbols that are neither letters, numbers nor space
            end = i + 1
            while end < len(text) and _kind(text[end]) == kind:
                end += 1
        out.append(text[i:end])
        i = end
    return out


def clean(text: str) -> str:
    return " ".join(html.unescape(html.unescape(text)).split()).lower()


class ClipTokenizer:
    """texts -> int32 [n, length]: start, BPE ids (+1), end, then 0 padding; too long texts keep the end token."""

    def __init__(self, vocab_path: str):
        vocab_path = str(vocab_path)
        self.path = vocab_path
        opener = gzip.open if vocab_path.endswith(".gz") else open
        with opener(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:]  # the first line is a version header
        merges = [tuple(line.split()) for line in lines if line.strip()][:MAX_MERGES]
        symbols, byte_order = byte_symbols()
        self.byte_symbol = dict(zip(byte_order, symbols, strict=True))
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
        self.ids = {piece: i for i, piece in enumerate(vocab)}
        self.pieces = vocab
        self.symbol_byte = {symbol: byte for byte, symbol in self.byte_symbol.items()}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.start, self.end = self.ids[SPECIALS[0]], self.ids[SPECIALS[1]]
        self.vocab_size = len(vocab) + 1  # + our padding id 0
        self._cache = {}

    def bpe(self, word: str) -> list[str]:
        """Merges the pair of lowest rank, everywhere in the word, until none is left."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def clip_ids(self, text: str) -> list[int]:
        """CLIP's ids of one text, without start and end tokens."""
        ids = []
        for piece in pieces(clean(text)):
            if piece in SPECIALS:
                ids.append(self.ids[piece])
                continue
            word = "".join(self.byte_symbol[b] for b in piece.encode("utf-8"))
            ids.extend(self.ids[part] for part in self.bpe(word))
        return ids

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """The text tower's int32 [n, max_len] (the same contract as tokenizer.Tokenizer.encode)."""
        out = np.zeros((len(texts), max_len), np.int32)
        for row, text in enumerate(texts):
            ids = [self.start, *self.clip_ids(text), self.end][:max_len]
            ids[-1] = self.end
            out[row, : len(ids)] = np.asarray(ids) + 1
        return out

    __call__ = encode

    def decode(self, tokens: np.ndarray) -> list[str]:
        """Texts back from encoded rows (padding, start and end dropped; words joined by single spaces)."""
        texts = []
        for row in np.atleast_2d(tokens):
            ids = [int(t) - 1 for t in row if t > 0 and int(t) - 1 not in (self.start, self.end)]
            symbols = "".join(self.pieces[i] for i in ids).replace("</w>", " ")
            words = []
            for chunk in symbols.split(" "):  # decode word by word so the spaces survive
                if chunk:
                    words.append(bytes(self.symbol_byte[c] for c in chunk).decode("utf-8", errors="replace"))
            texts.append(" ".join(words))
        return texts

    def word_alignment(self, text: str, max_len: int):
        raise ValueError(
            f"config.data.tokenizer.kind='{KIND}' ({self.path}) has no word alignment: a method or feature that needs "
            "words (masked language modelling, anchors) needs a sentencepiece tokenizer (kind='sentencepiece')"
        )
