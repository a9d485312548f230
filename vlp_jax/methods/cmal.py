"""CMAL (ACM MM 2022, arXiv 2410.12595): cross-modal associative learning over anchor points.

No code of the paper exists; each decision is tagged [paper] (its abstract/text), [review] (a secondary reading
of it) or [ours] (our design where the paper's details are unavailable; configurable in configs/cmal.py).

- Uni-modal encoders [paper]: visual objects and text tokens embedded in separate hypersphere spaces with
  positional encoding. [ours] The image tower's patch map pooled over the record's boxes, RoI-align style, plus
  the whole image (models/regions.py); an example without boxes uses its patch tokens. Each side has its own
  L2-normalised projection (`word_space`, `region_space`); the towers' pooled features also go to the joint
  space of the two-tower retrieval.
- Anchor points [paper]: entities present in both modalities, the intersection of object tags and words.
  [review] Both normalised with a synonym dictionary. [ours] A synonym/lemma JSON map (objectives/anchors.py),
  ambiguous names dropped; tag-free option: mutual-nearest word/region pairs above a cosine threshold in the two
  hypersphere spaces, stop-gradient (`anchors.source`). [ours] `anchors.align_weight`: a word→region InfoNCE on
  the tag anchors in those spaces, so the tag-free detector has something to find; its precision/recall against
  the tag anchors is logged every step.
- Cross-modal associative prompt [paper]: anchors masked and filled with swapped features of the other
  modality, a hybrid prompt. [review] The swap literally exchanges the features. [ours] A `swap_fraction` of the
  anchors is drawn per step; the word's token slots receive its region's feature and the region slot the word's
  (mean of its tokens), through learned swap adapters; type embeddings and positions added after the swap
  (models/unified.py).
- Unified semantic encoder [paper]: a multi-layer transformer over the prompt. [ours] Over [text tokens ; regions].
- AMC [paper]: classification at the anchors; [review] "the most likely pairing of visual and textual anchors".
  [ours] Each swapped word (region) scores every present anchor region (word) of its example from the unified
  outputs, softmax cross-entropy with the true partner as label, both directions; chance = 1 / anchors present,
  logged. Option `amc.target="word"`: the swapped word predicts its first token id.
- Auxiliary terms [ours; the paper's other losses are not reachable], each weighted and switchable:
  image-text contrastive on the uni-modal towers (negatives all-gathered, objectives/contrastive.py); image-text
  matching on the unified encoder with one hard negative text per image and image per text, mined from the
  all-gathered similarities (`mine_hard_negatives`, sampled ∝ softmax or the hardest); MLM on the unified encoder.
- Retrieval [ours]: two-tower from the uni-modal towers; re-ranking of its top-k by the unified encoder's matching
  score (evaluate/rerank.py).

Total L = λ_amc L_amc + λ_itc L_itc + λ_itm L_itm + λ_mlm L_mlm + λ_align L_align; every term is logged.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec

from vlp_jax.methods.base import Feature, Method, image_text_example
from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.heads import LogitScale, Projection
from vlp_jax.models.layers import dense, layer_norm
from vlp_jax.models.regions import region_slots, regions
from vlp_jax.models.unified import UnifiedEncoder
from vlp_jax.objectives import anchors
from vlp_jax.objectives.contrastive import contrastive_loss
from vlp_jax.objectives.masking import mlm_mask
from vlp_jax.parallel import BATCH_AXES, gather_batch, replica_index

FEATURES = ("image", "text", "boxes", "anchors")


class CmalModel(nn.Module):
    """Uni-modal towers + hypersphere projections + unified encoder + AMC, ITM and word heads."""

    model: ml_collections.ConfigDict  # config.model
    method: ml_collections.ConfigDict  # config.method

    def setup(self):
        cfg, dtype = self.model, jnp.dtype(self.model.dtype)
        unified = self.method.unified
        self.towers = DualEncoder(cfg)
        self.logit_scale = LogitScale(self.method.temperature_init, self.method.max_logit_scale)
        self.word_space = Projection(cfg.embed_dim, dtype)
        self.region_space = Projection(cfg.embed_dim, dtype)
        self.unified = UnifiedEncoder(unified.width, unified.depth, unified.heads, unified.mlp_dim,
                                      cfg.text.max_len, dtype, cfg.remat)
        self.amc_query = dense(unified.width, ("embed", None), dtype, "amc_query")
        self.amc_key = dense(unified.width, ("embed", None), dtype, "amc_key")
        self.itm_head = dense(2, ("embed", None), dtype, "itm_head")
        self.word_norm = layer_norm(dtype, "word_norm")
        self.word_head = dense(cfg.text.vocab_size, ("embed", "vocab"), dtype, "word_head")

    def encode_image(self, images, boxes, box_mask):
        """-> (unit-norm image [b, e], regions {"features", "boxes", "mask"}, unit-norm region vectors [b, R, e])."""
        image, aux = self.towers.encode_image(images)
        patches = aux["tokens"][:, 1:] if self.model.image.pool == "cls" else aux["tokens"]
        found = regions(patches, boxes, box_mask, self.method.regions.samples, self.method.regions.patch_fallback)
        return image, found, self.region_space(found["features"])

    def encode_text(self, tokens, token_mask=None):
        """-> (unit-norm text [b, e], token features [b, L, w], mask [b, L], unit-norm word vectors [b, L, e])."""
        text, aux = self.towers.encode_text(tokens, token_mask)
        return text, aux["tokens"], aux["mask"], self.word_space(aux["tokens"])

    def temperature_scale(self):
        return self.logit_scale()

    def fuse(self, text, text_mask, found, *swap):
        return self.unified(text, text_mask, found["features"], found["boxes"], found["mask"], *swap)

    def fuse_prompt(self, prompt):
        """The unified encoder over a prompt dict (methods/cmal.plain_prompt's keys)."""
        return self.unified(**prompt)

    def amc_scores(self, queries, keys):
        """[b, C, W] × [b, C, W] -> [b, C, C]."""
        scale = queries.shape[-1] ** -0.5
        return scale * jnp.einsum("bqw,bkw->bqk", self.amc_query(queries), self.amc_key(keys)).astype(jnp.float32)

    def match(self, hidden):
        """Image-text matching logits [b, 2] (not matched, matched) from the first (BOS) slot."""
        return self.itm_head(hidden[:, 0]).astype(jnp.float32)

    def predict_words(self, hidden):
        return self.word_head(self.word_norm(nn.gelu(hidden))).astype(jnp.float32)

    def __call__(self, images, tokens, boxes, box_mask):
        """Touches every parameter (used by init)."""
        _, found, _ = self.encode_image(images, boxes, box_mask)
        _, text, text_mask, _ = self.encode_text(tokens, jnp.zeros(tokens.shape, bool))
        swapped_text = jnp.zeros(tokens.shape, bool)
        swapped_regions = jnp.zeros(found["mask"].shape, bool)
        hidden = self.fuse(text, text_mask, found, jnp.zeros(text.shape[:2] + found["features"].shape[-1:]),
                           swapped_text, jnp.zeros(found["features"].shape[:2] + text.shape[-1:]), swapped_regions)
        return (self.amc_scores(hidden, hidden), self.match(hidden), self.predict_words(hidden),
                self.logit_scale())


class CmalMethod(Method):
    """CMAL on the Method protocol; `extra` is empty."""

    @classmethod
    def features(cls, config):
        return FEATURES

    @classmethod
    def example_batch(cls, config):
        boxes, length = config.data.max_boxes, config.model.text.max_len
        return {
            **image_text_example(config),
            "boxes": Feature((boxes, 4), "float32"),
            "box_mask": Feature((boxes,), "bool"),
            "region_tags": Feature((boxes,), "int32", boxes + 1),
            "token_tags": Feature((length,), "int32", boxes + 1),
            "token_words": Feature((length,), "int32", length),
            "boxes_dropped": Feature((), "int32", boxes + 1),
        }

    @classmethod
    def evaluators(cls, config):
        return {"rerank": {"type": "rerank", "every": 0}}

    def __init__(self, config, mesh, pretrained):
        super().__init__(config, mesh, pretrained)
        self.cfg = config.method
        check_config(config)
        self.model = CmalModel(config.model, config.method)
        grid = config.model.image.image_size // config.model.image.patch_size
        self.region_count = region_slots(config.data.max_boxes, grid, self.cfg.regions.patch_fallback)

    def apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=getattr(CmalModel, method))

    def init(self, rng, batch):
        variables = self.model.init(rng, batch["image"], batch["text"], batch["boxes"], batch["box_mask"])
        return variables["params"], {}

    def encode(self, params, batch):
        out = {}
        if "image" in batch:
            boxes, box_mask = eval_boxes(batch["image"].shape[0], self.config.data.max_boxes)
            out["image"] = self.apply(params, "encode_image", batch["image"], boxes, box_mask)[0]
        if "text" in batch:
            out["text"] = self.apply(params, "encode_text", batch["text"])[0]
        return out

    def match_scores(self, params, images, tokens):
        """The unified encoder's matching score (logit of 'matched' minus 'not') of pair i: images [n, S, S, 3],
        tokens [n, L] -> [n]. Eval images carry no boxes: their patches are the regions."""
        boxes, box_mask = eval_boxes(images.shape[0], self.config.data.max_boxes)
        _, found, _ = self.apply(params, "encode_image", images, boxes, box_mask)
        _, text, text_mask, _ = self.apply(params, "encode_text", tokens)
        logits = self.apply(params, "match", self.apply(params, "fuse", text, text_mask, found))
        return logits[:, 1] - logits[:, 0]

    def loss(self, params, extra, batch, rng, step):
        del step
        cfg = self.cfg
        swap_rng, mine_rng, mlm_rng = jax.random.split(rng, 3)
        image, found, region_vecs = self.apply(params, "encode_image", batch["image"], batch["boxes"],
                                               batch["box_mask"])
        size = batch["text"].shape[0]
        tokens, token_mask = batch["text"], jnp.zeros(batch["text"].shape, bool)
        if cfg.mlm.weight > 0:  # the masked captions go through the text tower with the clean ones, in one pass
            masked_tokens, embed_mask, predict = mlm_mask(mlm_rng, tokens, cfg.mlm, self.config.model.text.vocab_size)
            tokens = jnp.concatenate([tokens, masked_tokens])
            token_mask = jnp.concatenate([token_mask, embed_mask])
        encoded = self.apply(params, "encode_text", tokens, token_mask)
        text_emb, text, text_mask, word_vecs = (x[:size] for x in encoded)
        logit_scale = self.apply(params, "temperature_scale")
        metrics, total = {"temperature": 1.0 / logit_scale}, 0.0

        contrast = contrastive_loss(image, text_emb, logit_scale, self.mesh)
        metrics.update({"itc_loss": contrast["loss"], "i2t_accuracy": contrast["accuracy"]})
        if cfg.itc.weight > 0:
            total += cfg.itc.weight * contrast["loss"]

        boxes = batch["region_tags"].shape[1]
        region_tags = jnp.pad(batch["region_tags"], [(0, 0), (1, self.region_count - 1 - boxes)])  # [b, R]
        words = batch["token_words"] >= 0
        tag_pairs = anchors.pair_matrix(batch["token_tags"], region_tags)
        region_anchorable = found["mask"].at[:, 0].set(False)  # the whole image is never an anchor
        free_pairs = anchors.tag_free_pairs(word_vecs, region_vecs, words, region_anchorable, cfg.anchors.threshold)
        quality = anchors.pair_precision_recall(free_pairs, tag_pairs)
        metrics.update({"anchors/tag_pairs_per_example": tag_pairs.sum((1, 2)).mean(),
                        "anchors/tag_free_precision": quality["precision"],
                        "anchors/tag_free_recall": quality["recall"],
                        "boxes_dropped": batch["boxes_dropped"].mean()})
        if cfg.anchors.source == "tags":
            token_tags, concepts = batch["token_tags"], self.config.data.max_boxes
        else:
            token_tags, region_tags = anchors.tag_free_concepts(free_pairs)
            concepts = self.region_count
        word_of, region_of, present = anchors.concept_masks(token_tags, region_tags, concepts)

        if cfg.anchors.align_weight > 0:
            align, align_acc = anchor_alignment(word_of, region_of, present, word_vecs, region_vecs,
                                                region_anchorable, cfg.anchors.align_temperature)
            total += cfg.anchors.align_weight * align
            metrics.update({"align_loss": align, "align_accuracy": align_acc})

        # The unified encoder runs once over every prompt the terms need, stacked along the batch.
        prompts, readers = [], []
        if cfg.amc.weight > 0:
            prompt, read = self.amc_prompt(params, text, text_mask, found, batch["text"], word_of, region_of,
                                           present, swap_rng)
            prompts.append(prompt)
            readers.append(lambda hidden, read=read: _weighted(cfg.amc.weight, *read(hidden)))
        if cfg.itm.weight > 0:
            prompt, read = self.itm_prompt(image, text_emb, logit_scale, text, text_mask, found, mine_rng)
            prompts.append(prompt)
            readers.append(lambda hidden, read=read: _weighted(cfg.itm.weight, *read(params, hidden)))
        if cfg.mlm.weight > 0:
            prompts.append(plain_prompt(encoded[1][size:], encoded[2][size:], found))
            readers.append(lambda hidden: _weighted(cfg.mlm.weight, *self.mlm_read(params, hidden, batch["text"],
                                                                                   predict)))
        if prompts:
            stacked = {key: jnp.concatenate([prompt[key] for prompt in prompts]) for key in prompts[0]}
            hidden = self.apply(params, "fuse_prompt", stacked)
            start = 0
            for prompt, read in zip(prompts, readers, strict=True):
                rows = prompt["text"].shape[0]
                term, term_metrics = read(hidden[start : start + rows])
                start += rows
                total += term
                metrics.update(term_metrics)
        return total, (metrics, extra)

    def mlm_read(self, params, hidden, tokens, predict):
        logits = self.apply(params, "predict_words", hidden[:, : tokens.shape[1]])
        loss, accuracy = masked_cross_entropy(logits, tokens, predict)
        return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy}

    def amc_prompt(self, params, text, text_mask, found, tokens, word_of, region_of, present, rng):
        """The associative prompt (a sampled share of anchors swapped), and how AMC reads the unified encoder."""
        swapped = present & jax.random.bernoulli(rng, self.cfg.swap_fraction, present.shape)  # [b, C]
        word_share = word_of / jnp.maximum(word_of.sum(-1, keepdims=True), 1)  # [b, C, L] mean over its tokens
        region_feature = jnp.einsum("bcr,brd->bcd", region_of, found["features"])  # [b, C, wv]
        word_feature = jnp.einsum("bcl,bld->bcd", word_share, text)  # [b, C, wt]
        moved = swapped[..., None]
        prompt = {**plain_prompt(text, text_mask, found),
                  "text_swap": jnp.einsum("bcl,bcd->bld", word_of & moved, region_feature),  # [b, L, wv]
                  "text_swapped": (word_of & moved).any(1),
                  "region_swap": jnp.einsum("bcr,bcd->brd", region_of & moved, word_feature),  # [b, R, wt]
                  "region_swapped": (region_of & moved).any(1)}

        def read(hidden):
            length = text.shape[1]
            hidden_words = jnp.einsum("bcl,blw->bcw", word_share, hidden[:, :length])  # [b, C, W]
            hidden_regions = jnp.einsum("bcr,brw->bcw", region_of.astype(hidden.dtype), hidden[:, length:])
            rows = swapped.astype(jnp.float32)
            count = jnp.maximum(rows.sum(), 1.0)
            labels = jnp.broadcast_to(jnp.arange(swapped.shape[1]), swapped.shape)
            metrics = {"amc/swapped_per_example": rows.sum(1).mean(),
                       "amc/chance": (rows / jnp.maximum(present.sum(1, keepdims=True), 1)).sum() / count}
            if self.cfg.amc.target == "word":
                first_token = jnp.argmax(word_of, axis=-1)  # [b, C]
                targets = jnp.take_along_axis(tokens, first_token, axis=1)
                logits = self.apply(params, "predict_words", hidden_words)
                loss, accuracy = masked_cross_entropy(logits, targets, swapped)
                return loss, {**metrics, "amc_loss": loss, "amc_accuracy": accuracy}
            candidates = present[:, None, :]
            scores = functools.partial(self.apply, params, "amc_scores")
            word_to_region = jnp.where(candidates, scores(hidden_words, hidden_regions), -1e9)
            region_to_word = jnp.where(candidates, scores(hidden_regions, hidden_words), -1e9)
            losses = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(word_to_region, labels)
                            + optax.softmax_cross_entropy_with_integer_labels(region_to_word, labels))
            hits = 0.5 * ((jnp.argmax(word_to_region, -1) == labels).astype(jnp.float32)
                          + (jnp.argmax(region_to_word, -1) == labels).astype(jnp.float32))
            loss, accuracy = (losses * rows).sum() / count, (hits * rows).sum() / count
            return loss, {**metrics, "amc_loss": loss, "amc_accuracy": accuracy}

        return prompt, read

    def itm_prompt(self, image, text_emb, logit_scale, text, text_mask, found, rng):
        """Matching on the unified encoder: B positives, each image with a mined hard negative text and each text
        with a mined hard negative image; 2-way cross-entropy over the 3B pairs."""
        negative_text, negative_image = mine_hard_negatives(image, text_emb, logit_scale, self.mesh, rng,
                                                            self.cfg.itm.mining == "sample")
        texts = jnp.concatenate([text, jnp.take(text, negative_text, axis=0), text])
        masks = jnp.concatenate([text_mask, jnp.take(text_mask, negative_text, axis=0), text_mask])
        images = {key: jnp.concatenate([value, value, jnp.take(value, negative_image, axis=0)])
                  for key, value in found.items()}
        size = text.shape[0]

        def read(params, hidden):
            logits = self.apply(params, "match", hidden)  # [3B, 2]
            labels = jnp.concatenate([jnp.ones(size, jnp.int32), jnp.zeros(2 * size, jnp.int32)])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, {"itm_loss": loss, "itm_accuracy": (jnp.argmax(logits, -1) == labels).mean()}

        return plain_prompt(texts, masks, images), read


def plain_prompt(text, text_mask, found) -> dict[str, jax.Array]:
    """A prompt with nothing swapped: the unified encoder's inputs as one dict (stackable along the batch)."""
    return {"text": text, "text_mask": text_mask, "regions": found["features"], "region_boxes": found["boxes"],
            "region_mask": found["mask"],
            "text_swap": jnp.zeros(text.shape[:2] + found["features"].shape[-1:], found["features"].dtype),
            "text_swapped": jnp.zeros(text.shape[:2], bool),
            "region_swap": jnp.zeros(found["features"].shape[:2] + text.shape[-1:], text.dtype),
            "region_swapped": jnp.zeros(found["mask"].shape, bool)}


def _weighted(weight, loss, metrics):
    return weight * loss, metrics


def mine_hard_negatives(image, text, logit_scale, mesh, rng, sample: bool) -> tuple[jax.Array, jax.Array]:
    """For each pair i of the global batch: the global index of a hard negative text for image i and of a hard
    negative image for text i, from each replica's rows against the all-gathered other side (no gradient).

    `sample`: drawn ∝ softmax(similarity × logit_scale) over the other pairs (Gumbel-max with noise keyed by the
    global row, so every mesh draws the same); else the most similar other pair. image, text: unit-norm [B, d]."""
    rows, whole = PartitionSpec(BATCH_AXES), PartitionSpec()

    def local(image, text, logit_scale, rng):
        size = image.shape[0]
        global_rows = replica_index() * size + jnp.arange(size)  # [b]
        picks = []
        for direction, (queries, keys) in enumerate(((image, text), (text, image))):
            scores = logit_scale * queries.astype(jnp.float32) @ gather_batch(keys).astype(jnp.float32).T  # [b, B]
            if sample:
                key = jax.random.fold_in(rng, direction)
                scores += jax.vmap(lambda row, k=key, n=scores.shape[1]: jax.random.gumbel(
                    jax.random.fold_in(k, row), (n,)))(global_rows)
            own = jnp.arange(scores.shape[1])[None, :] == global_rows[:, None]
            picks.append(jnp.argmax(jnp.where(own, -jnp.inf, scores), axis=1).astype(jnp.int32))
        return tuple(picks)

    image, text = jax.lax.stop_gradient(image), jax.lax.stop_gradient(text)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, whole, whole), out_specs=(rows, rows))(
        image, text, jax.lax.stop_gradient(logit_scale), rng)


def anchor_alignment(word_of, region_of, present, word_vecs, region_vecs, region_valid, temperature):
    """Word→region InfoNCE in the hypersphere spaces: each present anchor's word (mean of its token vectors)
    against every valid region of its example; -> (loss, top-1 accuracy)."""
    share = word_of / jnp.maximum(word_of.sum(-1, keepdims=True), 1)
    words = jnp.einsum("bcl,ble->bce", share, word_vecs)  # [b, C, e]
    logits = jnp.einsum("bce,bre->bcr", words, region_vecs) / temperature
    logits = jnp.where(region_valid[:, None, :], logits, -1e9)
    labels = jnp.argmax(region_of, axis=-1)  # [b, C]
    rows = present.astype(jnp.float32)
    count = jnp.maximum(rows.sum(), 1.0)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * rows).sum() / count
    accuracy = ((jnp.argmax(logits, -1) == labels) * rows).sum() / count
    return loss, accuracy


def masked_cross_entropy(logits, targets, positions) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and top-1 accuracy over the positions marked in `positions` (bool, targets' shape)."""
    weights = positions.astype(jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum() / total
    return loss, ((jnp.argmax(logits, -1) == targets) * weights).sum() / total


def eval_boxes(size: int, max_boxes: int) -> tuple[jax.Array, jax.Array]:
    """No boxes (evaluation images carry none): zero rows, all masked."""
    return jnp.zeros((size, max_boxes, 4), jnp.float32), jnp.zeros((size, max_boxes), bool)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Options with a fixed set of values, checked when the method is built (before any data is read)."""
    method = config.method
    for key, value, allowed in (("anchors.source", method.anchors.source, ("tags", "similarity")),
                                ("amc.target", method.amc.target, ("pairing", "word")),
                                ("itm.mining", method.itm.mining, ("sample", "hardest"))):
        if value not in allowed:
            raise ValueError(f"config.method.{key}={value!r}; use one of {', '.join(map(repr, allowed))}")
    if not 0 <= method.swap_fraction <= 1:
        raise ValueError(f"config.method.swap_fraction={method.swap_fraction}; use a share in [0, 1]")

