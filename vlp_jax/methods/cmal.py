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

from vlp_jax.methods.base import Feature, Method, image_text_example, merge_rows, split_rows
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

    # -- the loss on the Method protocol's split (Method.loss), so CMAL accumulates exactly -----------------------
    # What crosses examples (the contrastive term, hard-negative mining and matching against another example's
    # caption or regions) is `embedding_loss` over the whole batch's per-example outputs: pooled embeddings, token
    # features, region features, hypersphere vectors. What stays inside an example (anchor alignment, AMC, MLM) is
    # `example_terms`, each normalised by its global count. [ours: the paper trains on one batch at a time]
    def embed(self, params, batch):
        """The trainable per-example outputs: unit-norm image and text, the text tower's token features, the
        regions' features and both sides' hypersphere vectors."""
        image, found, region_vecs = self.apply(params, "encode_image", batch["image"], batch["boxes"],
                                               batch["box_mask"])
        text_emb, text, _, word_vecs = self.apply(params, "encode_text", batch["text"])
        return {"image": image, "text": text_emb, "tokens": text, "regions": found["features"],
                "word_vecs": word_vecs, "region_vecs": region_vecs}

    def embed_constants(self, params, extra, batch, step):
        """Per-example arrays without gradient: the masks and boxes of the regions, the anchors (from the tags, or
        detected in the hypersphere spaces) and the tag/tag-free pairs the anchor metrics compare."""
        del extra, step
        frozen = jax.lax.stop_gradient(params)
        _, found, region_vecs = self.apply(frozen, "encode_image", batch["image"], batch["boxes"], batch["box_mask"])
        _, _, text_mask, word_vecs = self.apply(frozen, "encode_text", batch["text"])
        cfg = self.cfg
        boxes = batch["region_tags"].shape[1]
        region_tags = jnp.pad(batch["region_tags"], [(0, 0), (1, self.region_count - 1 - boxes)])  # [b, R]
        region_anchorable = found["mask"].at[:, 0].set(False)  # the whole image is never an anchor
        tag_pairs = anchors.pair_matrix(batch["token_tags"], region_tags)
        free_pairs = anchors.tag_free_pairs(word_vecs, region_vecs, batch["token_words"] >= 0, region_anchorable,
                                            cfg.anchors.threshold)
        if cfg.anchors.source == "tags":
            token_tags, concepts = batch["token_tags"], self.config.data.max_boxes
        else:
            token_tags, region_tags = anchors.tag_free_concepts(free_pairs)
            concepts = self.region_count
        word_of, region_of, present = anchors.concept_masks(token_tags, region_tags, concepts)
        return {"text_mask": text_mask, "region_mask": found["mask"], "region_boxes": found["boxes"],
                "region_anchorable": region_anchorable, "tag_pairs": tag_pairs, "free_pairs": free_pairs,
                "word_of": word_of, "region_of": region_of, "present": present,
                "boxes_dropped": batch["boxes_dropped"].astype(jnp.float32)}

    def embedding_loss(self, params, embeddings, constants, extra, rng, step):
        """The contrastive term and image-text matching with hard negatives mined from the whole global batch; the
        matching pairs run through the unified encoder one micro-batch's share at a time (rematerialised)."""
        del step
        cfg = self.cfg
        logit_scale = self.apply(params, "temperature_scale")
        contrast = contrastive_loss(embeddings["image"], embeddings["text"], logit_scale, self.mesh)
        quality = anchors.pair_precision_recall(constants["free_pairs"], constants["tag_pairs"])
        metrics = {"temperature": 1.0 / logit_scale, "itc_loss": contrast["loss"], "i2t_accuracy": contrast["accuracy"],
                   "anchors/tag_pairs_per_example": constants["tag_pairs"].sum((1, 2)).mean(),
                   "anchors/tag_free_precision": quality["precision"], "anchors/tag_free_recall": quality["recall"],
                   "boxes_dropped": constants["boxes_dropped"].mean()}
        total = cfg.itc.weight * contrast["loss"] if cfg.itc.weight > 0 else jnp.float32(0.0)
        if cfg.itm.weight > 0:
            itm, itm_metrics = self.matching(params, embeddings, constants, logit_scale,
                                             jax.random.split(rng, 3)[1])
            total += cfg.itm.weight * itm
            metrics.update(itm_metrics)
        return total, (metrics, extra)

    def example_inputs(self, extra, batch, constants, rng, step):
        """The anchors to swap and the MLM masks, drawn once for the global batch; the global counts of swapped
        anchors, present anchors and predicted tokens normalise the terms."""
        del extra, step
        cfg = self.cfg
        swap_rng, _, mlm_rng = jax.random.split(rng, 3)  # the middle key mines the hard negatives
        present = constants["present"]
        inputs = {key: constants[key] for key in ("text_mask", "region_mask", "region_boxes", "region_anchorable",
                                                  "word_of", "region_of", "present")}
        inputs["swapped"] = present & jax.random.bernoulli(swap_rng, cfg.swap_fraction, present.shape)  # [B, C]
        totals = {"examples": jnp.float32(present.shape[0]), "present": _count(present),
                  "swapped": _count(inputs["swapped"])}
        if cfg.mlm.weight > 0:
            tokens, embed_mask, predict = mlm_mask(mlm_rng, batch["text"], cfg.mlm, self.config.model.text.vocab_size)
            inputs.update(mlm_tokens=tokens, mlm_embed_mask=embed_mask, mlm_predict=predict)
            totals["mlm"] = _count(predict)
        return inputs, totals

    def example_terms(self, params, extra, batch, embeddings, inputs, totals):
        """Anchor alignment, AMC and MLM of these rows (AMC's and MLM's prompts through the unified encoder in one
        pass), each divided by its global count so micro-batches add up to the whole batch."""
        del extra
        cfg = self.cfg
        found = {"features": embeddings["regions"], "boxes": inputs["region_boxes"], "mask": inputs["region_mask"]}
        text, text_mask = embeddings["tokens"], inputs["text_mask"]
        word_of, region_of, present = inputs["word_of"], inputs["region_of"], inputs["present"]
        loss, metrics = jnp.float32(0.0), {}
        if cfg.anchors.align_weight > 0:
            align, align_acc = anchor_alignment(word_of, region_of, present, embeddings["word_vecs"],
                                                embeddings["region_vecs"], inputs["region_anchorable"],
                                                cfg.anchors.align_temperature, totals["present"])
            loss += cfg.anchors.align_weight * align
            metrics.update({"align_loss": align, "align_accuracy": align_acc})
        prompts, readers = [], []
        if cfg.amc.weight > 0:
            prompt, read = self.amc_prompt(params, text, text_mask, found, batch["text"], word_of, region_of,
                                           present, inputs["swapped"], totals)
            prompts.append(prompt)
            readers.append(lambda hidden, read=read: _weighted(cfg.amc.weight, *read(hidden)))
        if cfg.mlm.weight > 0:
            _, masked, masked_mask, _ = self.apply(params, "encode_text", inputs["mlm_tokens"],
                                                   inputs["mlm_embed_mask"])
            prompts.append(plain_prompt(masked, masked_mask, found))
            readers.append(lambda hidden: _weighted(cfg.mlm.weight, *self.mlm_read(
                params, hidden, batch["text"], inputs["mlm_predict"], totals["mlm"])))
        if prompts:
            stacked = {key: jnp.concatenate([prompt[key] for prompt in prompts]) for key in prompts[0]}
            hidden = self.apply(params, "fuse_prompt", stacked)
            start = 0
            for prompt, read in zip(prompts, readers, strict=True):
                rows = prompt["text"].shape[0]
                term, term_metrics = read(hidden[start : start + rows])
                start += rows
                loss += term
                metrics.update(term_metrics)
        return loss, metrics

    def matching(self, params, embeddings, constants, logit_scale, rng):
        """Image-text matching on the unified encoder: B positives, each image with a mined hard negative text and
        each text with a mined hard negative image; 2-way cross-entropy over the 3B pairs. With micro-batches the
        pairs run in as many interleaved parts under jax.checkpoint, so one part's activations are live at a time."""
        negative_text, negative_image = mine_hard_negatives(embeddings["image"], embeddings["text"], logit_scale,
                                                            self.mesh, rng, self.cfg.itm.mining == "sample")
        text, text_mask = embeddings["tokens"], constants["text_mask"]
        found = {"features": embeddings["regions"], "boxes": constants["region_boxes"],
                 "mask": constants["region_mask"]}
        # [3, B, ...]: (image i, text i), (image i, its negative text), (i's negative image, text i)
        pairs = {"text": jnp.stack([text, jnp.take(text, negative_text, axis=0), text]),
                 "text_mask": jnp.stack([text_mask, jnp.take(text_mask, negative_text, axis=0), text_mask]),
                 "found": {key: jnp.stack([value, value, jnp.take(value, negative_image, axis=0)])
                           for key, value in found.items()}}

        def logits_of(pairs):  # [3, b, ...] -> [3, b, 2]
            flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), pairs)
            prompt = plain_prompt(flat["text"], flat["text_mask"], flat["found"])
            return self.apply(params, "match", self.apply(params, "fuse_prompt", prompt)).reshape(3, -1, 2)

        parts = self.config.train.get("microbatches", 1)
        if parts > 1:
            split = jax.tree.map(lambda x: jnp.swapaxes(split_rows(jnp.swapaxes(x, 0, 1), parts), 1, 2), pairs)
            logits = jnp.swapaxes(merge_rows(jnp.swapaxes(jax.lax.map(jax.checkpoint(logits_of), split), 1, 2)),
                                  0, 1)
        else:
            logits = logits_of(pairs)
        labels = jnp.zeros(logits.shape[:2], jnp.int32).at[0].set(1)  # [3, B]: only the first row matches
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"itm_loss": loss, "itm_accuracy": (jnp.argmax(logits, -1) == labels).mean()}

    def mlm_read(self, params, hidden, tokens, predict, total):
        logits = self.apply(params, "predict_words", hidden[:, : tokens.shape[1]])
        loss, accuracy = masked_cross_entropy(logits, tokens, predict, total)
        return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy}

    def amc_prompt(self, params, text, text_mask, found, tokens, word_of, region_of, present, swapped, totals):
        """The associative prompt (the `swapped` anchors [b, C] exchanged), and how AMC reads the unified encoder;
        its loss and metrics are divided by the global batch's `totals`."""
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
            count = totals["swapped"]
            labels = jnp.broadcast_to(jnp.arange(swapped.shape[1]), swapped.shape)
            metrics = {"amc/swapped_per_example": rows.sum() / totals["examples"],
                       "amc/chance": (rows / jnp.maximum(present.sum(1, keepdims=True), 1)).sum() / count}
            if self.cfg.amc.target == "word":
                first_token = jnp.argmax(word_of, axis=-1)  # [b, C]
                targets = jnp.take_along_axis(tokens, first_token, axis=1)
                logits = self.apply(params, "predict_words", hidden_words)
                loss, accuracy = masked_cross_entropy(logits, targets, swapped, count)
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


def anchor_alignment(word_of, region_of, present, word_vecs, region_vecs, region_valid, temperature, count):
    """Word→region InfoNCE in the hypersphere spaces: each present anchor's word (mean of its token vectors)
    against every valid region of its example; -> (loss, top-1 accuracy), sums over the anchors divided by `count`
    (the global batch's present anchors)."""
    share = word_of / jnp.maximum(word_of.sum(-1, keepdims=True), 1)
    words = jnp.einsum("bcl,ble->bce", share, word_vecs)  # [b, C, e]
    logits = jnp.einsum("bce,bre->bcr", words, region_vecs) / temperature
    logits = jnp.where(region_valid[:, None, :], logits, -1e9)
    labels = jnp.argmax(region_of, axis=-1)  # [b, C]
    rows = present.astype(jnp.float32)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * rows).sum() / count
    accuracy = ((jnp.argmax(logits, -1) == labels) * rows).sum() / count
    return loss, accuracy


def masked_cross_entropy(logits, targets, positions, total) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and top-1 accuracy summed over the positions marked in `positions` (bool, targets' shape) and
    divided by `total` (the global batch's count of such positions: the sums of micro-batches add up)."""
    weights = positions.astype(jnp.float32)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum() / total
    return loss, ((jnp.argmax(logits, -1) == targets) * weights).sum() / total


def _count(marked: jax.Array) -> jax.Array:
    """How many entries are marked, at least 1 (a term's normaliser)."""
    return jnp.maximum(marked.astype(jnp.float32).sum(), 1.0)


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

