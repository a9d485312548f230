"""COTS (CVPR 2022, arXiv 2204.07441): two independent streams with three levels of interaction.

- Instance level [paper]: momentum contrastive learning (methods/momentum_contrast.py). [ours] Negatives are
  the all-gathered momentum keys of the global batch; the paired queue is optional (`queue_size > 0`).
- Token level [paper]: masked vision-language modelling without a cross-stream network. [ours] MLM: BERT masking
  (15%; 80/10/10) of the caption, predicted from the masked text's tokens fused with the paired image's global
  feature (`fusion`: add or concat). MVM: BEiT-style blockwise masking (~40%) of the patches, predicting the codes
  of our trainable VQ tokenizer (methods/vq.py) from the unmasked patches fused with the paired text's global
  feature. The tokenizer is another run's weights (`pretrained`): configs/cots.py declares a `tokenizer` stage
  that trains it first into `<workdir>/tokenizer` unless `method.mvm.tokenizer` names one (vlp_jax/stages.py).
- Task level [paper]: KL alignment of the image→text and text→image retrieval distributions over the same
  negatives; column k of both is pair k (instance loss's logits). [ours] Symmetrised by default.
- Adaptive momentum filter [paper, details ours]: see objectives/momentum.py. Filtered pairs get weight 0 in every
  term and are not enqueued.

Total L = L_inst + λ_kl L_kl + λ_mlm L_mlm + λ_mvm L_mvm; each term and the filtered fraction are logged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlp_jax.methods import vq
from vlp_jax.methods.base import Pretrained
from vlp_jax.methods.brivl import temperature_fields
from vlp_jax.methods.momentum_contrast import MomentumContrastMethod
from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.heads import Temperature, TokenPredictionHead
from vlp_jax.objectives.masking import block_mask, mlm_mask

TOKENIZER = "tokenizer"  # the name of the tokenizer among the method's pretrained inputs (and of its stage)


class CotsModel(nn.Module):
    """Dual encoder (no cross-stream module) + MLM and MVM prediction heads + temperature."""

    model: ml_collections.ConfigDict  # config.model
    mlm_fusion: str
    mvm_fusion: str
    codebook_size: int
    tau: float  # initial (or fixed) temperature
    learn_tau: bool
    max_logit_scale: float

    def setup(self):
        dtype = jnp.dtype(self.model.dtype)
        self.towers = DualEncoder(self.model)
        self.mlm_head = TokenPredictionHead(self.model.text.vocab_size, self.mlm_fusion, dtype)
        self.mvm_head = TokenPredictionHead(self.codebook_size, self.mvm_fusion, dtype)
        self.temperature = Temperature(self.tau, self.learn_tau, self.max_logit_scale)

    def encode_image(self, images, patch_mask=None):
        return self.towers.encode_image(images, patch_mask)

    def encode_text(self, tokens, token_mask=None):
        return self.towers.encode_text(tokens, token_mask)

    def logit_scale(self):
        return self.temperature()

    def predict_words(self, text_tokens, image_global):
        return self.mlm_head(text_tokens, image_global)

    def predict_codes(self, patch_tokens, text_global):
        return self.mvm_head(patch_tokens, text_global)

    def __call__(self, images, tokens, patch_mask, token_mask):
        """Touches every parameter (used by init)."""
        _, image_aux = self.encode_image(images, patch_mask)
        _, text_aux = self.encode_text(tokens, token_mask)
        num_patches = patch_mask.shape[1]
        return (self.predict_words(text_aux["tokens"], image_aux["pooled"]),
                self.predict_codes(image_aux["tokens"][:, -num_patches:], text_aux["pooled"]),
                self.logit_scale())


class CotsMethod(MomentumContrastMethod):
    """COTS on the Method protocol; `extra` adds {"tokenizer": frozen VQ tokenizer {"params", "codebook"}}."""

    online_only = ("temperature", "mlm_head", "mvm_head")

    @classmethod
    def pretrained(cls, config):
        return {TOKENIZER: Pretrained("method.mvm.tokenizer", items=("params", "extra"), method=vq.NAME)}

    def __init__(self, config, mesh, pretrained):
        run = pretrained[TOKENIZER]
        self.vq_config = run.config
        self.tokenizer = {"params": run.trees["params"], "codebook": run.trees["extra"]}
        check_tokenizer(config, self.vq_config)
        self.codebook_size = self.vq_config.method.codebook_size
        super().__init__(config, mesh, pretrained)

    def build_model(self) -> CotsModel:
        cfg = self.cfg
        return CotsModel(self.config.model, cfg.mlm.fusion, cfg.mvm.fusion, self.codebook_size,
                         **temperature_fields(cfg))

    @property
    def grid(self) -> int:
        return self.config.model.image.image_size // self.config.model.image.patch_size

    def init_inputs(self, batch):
        size = batch["image"].shape[0]
        patch_mask = jnp.zeros((size, self.grid * self.grid), jnp.bool_)
        return batch["image"], batch["text"], patch_mask, jnp.zeros(batch["text"].shape, jnp.bool_)

    def init(self, rng, batch):
        params, extra = super().init(rng, batch)
        return params, {**extra, "tokenizer": jax.tree.map(jnp.asarray, self.tokenizer)}

    # -- the token level: per-example terms (Method.example_inputs / example_terms), so COTS accumulates exactly ----
    def embed(self, params, batch):
        """The online queries and the towers' pooled features (the other stream's context for MLM and MVM)."""
        image, image_aux = self.apply(params, "encode_image", batch["image"])
        text, text_aux = self.apply(params, "encode_text", batch["text"])
        return {"image": image, "text": text, "image_pooled": image_aux["pooled"], "text_pooled": text_aux["pooled"]}

    def embed_constants(self, params, extra, batch, step):
        """The momentum keys and, for MVM, the frozen tokenizer's code of every patch."""
        constants = super().embed_constants(params, extra, batch, step)
        if self.cfg.mvm.weight > 0:
            constants["codes"] = jax.lax.stop_gradient(
                vq.image_codes(self.vq_config, extra["tokenizer"], batch["image"]))
        return constants

    def example_inputs(self, extra, batch, constants, rng, step):
        """The AMF pair weights, the MLM and MVM masks drawn for the whole global batch, the patch codes; the
        weighted counts of predicted positions normalise each term."""
        cfg = self.cfg
        weights, _, _ = self.filter_weights(extra, constants, step)
        mlm_rng, mvm_rng = jax.random.split(jax.random.fold_in(rng, 1))
        inputs, totals = {"weights": weights}, {}
        if cfg.mlm.weight > 0:
            tokens, embed_mask, predict = mlm_mask(mlm_rng, batch["text"], cfg.mlm, self.config.model.text.vocab_size)
            inputs.update(mlm_tokens=tokens, mlm_embed_mask=embed_mask, mlm_predict=predict)
            totals["mlm"] = _weighted_count(predict, weights)
        if cfg.mvm.weight > 0:
            patch_mask = block_mask(mvm_rng, batch["image"].shape[0], self.grid, cfg.mvm)
            inputs.update(mvm_mask=patch_mask, codes=constants["codes"])
            totals.update(mvm=_weighted_count(patch_mask, weights), patches=jnp.float32(patch_mask.size))
        return inputs, totals

    def example_terms(self, params, extra, batch, embeddings, inputs, totals):
        """MLM (the masked caption fused with its image's pooled feature) and MVM (the masked patches fused with
        the caption's pooled feature), each a weighted sum over predicted positions divided by the global count."""
        cfg, weights = self.cfg, inputs["weights"]
        metrics, loss = {}, jnp.float32(0.0)
        if cfg.mlm.weight > 0:
            _, masked = self.apply(params, "encode_text", inputs["mlm_tokens"], inputs["mlm_embed_mask"])
            logits = self.apply(params, "predict_words", masked["tokens"], embeddings["image_pooled"])
            mlm_loss, mlm_acc = _masked_cross_entropy(logits, batch["text"], inputs["mlm_predict"], weights,
                                                      totals["mlm"])
            loss += cfg.mlm.weight * mlm_loss
            metrics.update({"mlm_loss": mlm_loss, "mlm_accuracy": mlm_acc})
        if cfg.mvm.weight > 0:
            patch_mask = inputs["mvm_mask"]
            _, masked = self.apply(params, "encode_image", batch["image"], patch_mask)
            patches = masked["tokens"][:, -patch_mask.shape[1]:]
            logits = self.apply(params, "predict_codes", patches, embeddings["text_pooled"])
            mvm_loss, mvm_acc = _masked_cross_entropy(logits, inputs["codes"], patch_mask, weights, totals["mvm"])
            loss += cfg.mvm.weight * mvm_loss
            metrics.update({"mvm_loss": mvm_loss, "mvm_accuracy": mvm_acc,
                            "mvm_masked_fraction": patch_mask.sum() / totals["patches"]})
        return loss, metrics


def _weighted_count(positions, weights) -> jax.Array:
    """The number of predicted positions, each row weighted (AMF); at least 1 (a term's normaliser)."""
    return jnp.maximum((positions.astype(jnp.float32) * weights[:, None]).sum(), 1.0)


def _masked_cross_entropy(logits, targets, positions, weights, total) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy summed over the predicted positions, each row weighted (AMF), divided by the global batch's
    `total`; and the top-1 accuracy likewise (both add up over micro-batches)."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b, t]
    counted = positions.astype(jnp.float32) * weights[:, None]
    accuracy = ((jnp.argmax(logits, -1) == targets) * counted).sum() / total
    return (per_token * counted).sum() / total, accuracy


def check_tokenizer(config: ml_collections.ConfigDict, vq_config: ml_collections.ConfigDict) -> None:
    """MVM predicts one code per ViT patch, so the tokenizer must see the same image size and patch grid."""
    want = (config.model.image.image_size, config.model.image.patch_size)
    got = (vq_config.model.image.image_size, vq_config.model.image.patch_size)
    if want != got:
        raise ValueError(
            f"config.method.mvm.tokenizer={config.method.mvm.tokenizer!r} was trained on {got[0]}px images with "
            f"{got[1]}px patches but this model uses {want[0]}px / {want[1]}px; train a matching tokenizer (leave "
            "config.method.mvm.tokenizer empty and the tokenizer stage trains one first)"
        )
