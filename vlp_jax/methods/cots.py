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

    def extra_terms(self, params, extra, batch, rng, weights, image_aux, text_aux):
        cfg = self.cfg
        mlm_rng, mvm_rng = jax.random.split(jax.random.fold_in(rng, 1))
        metrics, loss = {}, 0.0
        if cfg.mlm.weight > 0:
            inputs, embed_mask, predict = mlm_mask(mlm_rng, batch["text"], cfg.mlm,
                                                   self.config.model.text.vocab_size)
            _, masked = self.apply(params, "encode_text", inputs, embed_mask)
            logits = self.apply(params, "predict_words", masked["tokens"], image_aux["pooled"])
            mlm_loss, mlm_acc = _masked_cross_entropy(logits, batch["text"], predict, weights)
            loss += cfg.mlm.weight * mlm_loss
            metrics.update({"mlm_loss": mlm_loss, "mlm_accuracy": mlm_acc})
        if cfg.mvm.weight > 0:
            patch_mask = block_mask(mvm_rng, batch["image"].shape[0], self.grid, cfg.mvm)
            codes = jax.lax.stop_gradient(vq.image_codes(self.vq_config, extra["tokenizer"], batch["image"]))
            _, masked = self.apply(params, "encode_image", batch["image"], patch_mask)
            patches = masked["tokens"][:, -patch_mask.shape[1]:]
            logits = self.apply(params, "predict_codes", patches, text_aux["pooled"])
            mvm_loss, mvm_acc = _masked_cross_entropy(logits, codes, patch_mask, weights)
            loss += cfg.mvm.weight * mvm_loss
            metrics.update({"mvm_loss": mvm_loss, "mvm_accuracy": mvm_acc, "mvm_masked_fraction": patch_mask.mean()})
        return loss, metrics


def _masked_cross_entropy(logits, targets, positions, weights) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the predicted positions, each row weighted (AMF); and the top-1 accuracy."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b, t]
    counted = positions.astype(jnp.float32) * weights[:, None]
    total = jnp.maximum(counted.sum(), 1.0)
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
