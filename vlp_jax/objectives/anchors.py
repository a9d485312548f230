"""CMAL anchor points: entities present in both the image (object tags / regions) and the caption (words).

Two detectors, one representation. Both give, per example, concept slots c = 1..C (C = data.max_boxes): concept c
is one region and the caption token(s) of one word, so "which region is this word's partner" is a C-way choice.

- Tag-based (host side, in the data pipeline): object tags and caption words are normalised through a
  synonym/lemma map kept as data (vlp_jax/data/anchor_map.json, overridable) and intersected. A normalised name
  that more than one kept box or more than one caption word carries is ambiguous and dropped (precision over
  recall). The example carries `region_tags` int32 [C] and `token_tags` int32 [L] (the concept id, 0 = none).
- Tag-free (in the model): a word token and a region are an anchor pair when each is the other's most similar
  (cosine in the two hypersphere spaces) and the similarity exceeds a threshold; stop-gradient.

`world_anchor_quality` scores the tag-based detector against the embedded world's ground truth (which caption
word names which object); `pair_precision_recall` scores any detector against reference pairs.
"""

import json
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

DEFAULT_MAP = epath.Path(__file__).parent.parent / "data" / "anchor_map.json"
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class Normaliser:
    """Maps a tag or a caption word to its canonical name ('' = never an anchor); both sides use the same rules,
    so a wrong lemma ('bus' -> 'bu') still matches itself."""

    def __init__(self, synonyms: dict[str, str], plurals: dict[str, str], ignore: list[str]):
        self.synonyms = {key.lower(): value.lower() for key, value in synonyms.items()}
        self.plurals = {key.lower(): value.lower() for key, value in plurals.items()}
        self.ignore = frozenset(word.lower() for word in ignore)

    @classmethod
    def load(cls, path: str | epath.PathLike = "") -> "Normaliser":
        """The map at `path` ('' = the packaged default); a missing or malformed file is an error naming it."""
        path = epath.Path(path or DEFAULT_MAP)
        try:
            table = json.loads(path.read_text())
            return cls(table.get("synonyms", {}), table.get("plurals", {}), table.get("ignore", []))
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(
                f"anchor map {path} is unreadable ({error}); it must be a JSON object with 'synonyms' and "
                "'plurals' (word -> word) and 'ignore' (list of words); see vlp_jax/data/anchor_map.json"
            ) from error

    def __call__(self, text: str) -> str:
        phrase = " ".join(_PUNCTUATION.sub(" ", text.lower()).split())
        if not phrase or phrase in self.ignore:
            return ""
        if phrase in self.synonyms:
            return self.synonyms[phrase]
        if " " in phrase:  # a multi-word tag ('dining table') anchors by its head noun
            return self(phrase.rsplit(" ", 1)[1])
        lemma = self.plurals.get(phrase) or _singular(phrase)
        return self.synonyms.get(lemma, lemma)


def _singular(word: str) -> str:
    """Regular English plurals: -ies -> -y, -(s|x|ch|sh)es -> stem, -s (not -ss, -us) -> stem."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us")):
        return word[:-1]
    return word


def tag_anchors(tags: list[str], words: list[str], normalise: Normaliser) -> tuple[np.ndarray, np.ndarray]:
    """Concept ids of tag-based anchors: (per tag int32 [len(tags)], per word int32 [len(words)]), 0 = none.

    Concept c (1, 2, ...) numbers the anchored names in tag order; a name carried by several tags or several
    words is ambiguous and not an anchor."""
    tag_names = [normalise(tag) for tag in tags]
    word_names = [normalise(word) for word in words]
    region_ids = np.zeros(len(tags), np.int32)
    word_ids = np.zeros(len(words), np.int32)
    concept = 0
    for index, name in enumerate(tag_names):
        if not name or tag_names.count(name) != 1 or word_names.count(name) != 1:
            continue
        concept += 1
        region_ids[index] = concept
        word_ids[word_names.index(name)] = concept
    return region_ids, word_ids


def anchor_example(tags: list[str], kept: np.ndarray, words: list[str], token_words: np.ndarray,
                   max_boxes: int, normalise: Normaliser) -> dict[str, np.ndarray]:
    """The data feature of one example: `region_tags` int32 [max_boxes] over the kept boxes (`kept`: indices into
    `tags` of the boxes the crop kept, in feature order) and `token_tags` int32 [L] over the caption's tokens
    (`token_words`: each token's word index, -1 = none)."""
    region_ids, word_ids = tag_anchors([tags[i] for i in kept[:max_boxes]], words, normalise)
    region_tags = np.zeros(max_boxes, np.int32)
    region_tags[: len(region_ids)] = region_ids
    token_tags = np.where(token_words >= 0, word_ids[np.clip(token_words, 0, None)] if len(words) else 0, 0)
    return {"region_tags": region_tags, "token_tags": token_tags.astype(np.int32)}


# -- in the model ------------------------------------------------------------------------------------------------

def concept_masks(token_tags: jax.Array, region_tags: jax.Array, concepts: int):
    """One-hot memberships of concepts 1..C: (tokens bool [b, C, L], regions bool [b, C, R], present bool [b, C]:
    the concept has a region and at least one token)."""
    ids = jnp.arange(1, concepts + 1)[None, :, None]
    tokens = token_tags[:, None, :] == ids
    regions = region_tags[:, None, :] == ids
    return tokens, regions, tokens.any(-1) & regions.any(-1)


def pair_matrix(token_tags: jax.Array, region_tags: jax.Array) -> jax.Array:
    """Anchor pairs as bool [b, L, R]: token l and region r carry the same concept (> 0)."""
    return (token_tags[:, :, None] == region_tags[:, None, :]) & (token_tags[:, :, None] > 0)


def tag_free_pairs(words: jax.Array, regions: jax.Array, token_valid: jax.Array, region_valid: jax.Array,
                   threshold: float) -> jax.Array:
    """Tag-free anchors bool [b, L, R]: mutual nearest word token and region (unit-norm words [b, L, d], regions
    [b, R, d]) with cosine above `threshold`; no gradient flows."""
    similarity = jax.lax.stop_gradient(jnp.einsum("bld,brd->blr", words, regions).astype(jnp.float32))
    valid = token_valid[:, :, None] & region_valid[:, None, :]
    similarity = jnp.where(valid, similarity, -jnp.inf)
    best_region = similarity == similarity.max(axis=2, keepdims=True)
    best_token = similarity == similarity.max(axis=1, keepdims=True)
    return best_region & best_token & valid & (similarity > threshold)


def tag_free_concepts(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tag-free pairs bool [b, L, R] (mutual nearest: at most one pair per token and per region) as concept ids
    in the tag-based layout: (token_tags int32 [b, L], region_tags int32 [b, R]), concept = region index + 1."""
    region_ids = jnp.arange(1, pairs.shape[2] + 1)
    token_tags = jnp.max(jnp.where(pairs, region_ids[None, None, :], 0), axis=2)
    region_tags = jnp.where(pairs.any(axis=1), region_ids[None, :], 0)
    return token_tags.astype(jnp.int32), region_tags.astype(jnp.int32)


def pair_precision_recall(predicted: jax.Array, reference: jax.Array) -> dict[str, jax.Array]:
    """Precision and recall of predicted pairs against reference pairs (bool arrays of one shape), pooled."""
    hits = jnp.sum(predicted & reference)
    return {"precision": hits / jnp.maximum(predicted.sum(), 1), "recall": hits / jnp.maximum(reference.sum(), 1)}


# -- ground truth of the embedded world --------------------------------------------------------------------------

def world_anchor_quality(world, split: str, num: int, normalise: Normaliser) -> dict[str, float]:
    """Tag-based anchors on `num` scenes of the embedded world against the truth: each object's phrase ('large red
    circle') is in every caption, so the word naming object k is its shape noun right after its size and colour.
    Pairs are (caption, word index, object index); precision = right / detected, recall = right / true."""
    from vlp_jax.data import synthetic  # only this evaluation needs the world's generator

    detected = right = true = 0
    for scene in synthetic.generate_scenes(world, split, num):
        tags = [obj.tag for obj in scene.objects]
        for caption in scene.captions:
            words = caption.split()
            truth = set()
            for k, obj in enumerate(scene.objects):
                for i in range(len(words) - 2):
                    if words[i:i + 3] == [obj.size, obj.colour, obj.shape]:
                        truth.add((i + 2, k))
            region_ids, word_ids = tag_anchors(tags, words, normalise)
            found = {(int(np.flatnonzero(word_ids == c)[0]), int(np.flatnonzero(region_ids == c)[0]))
                     for c in range(1, int(region_ids.max(initial=0)) + 1)}
            detected += len(found)
            right += len(found & truth)
            true += len(truth)
    return {"precision": right / max(detected, 1), "recall": right / max(true, 1), "pairs": true}
