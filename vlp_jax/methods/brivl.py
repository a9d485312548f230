"""BriVL (WenLan, arXiv 2103.06561): two towers with per-tower heads and a cross-modal MoCo loss.

What comes from where ([code]: the released code; [ours]: our design where the paper and code are silent):
- [code] Per-tower heads: a small transformer over the tower's token features (region/patch or word), masked mean
  pooling, a 2-layer MLP into the joint space, L2 normalisation. Momentum update θ' ← m·θ' + (1 − m)·θ before the
  keys are computed; i2t logits score v against the momentum text keys, t2i score t against the momentum image
  keys, τ = 0.07, m = 0.99; queues of 9,600 keys enqueued together.
- [ours] Negatives default to the all-gathered momentum keys of the global batch (the batch is the dictionary);
  the paired queue is optional (`queue_size > 0`), and `in_batch_negatives=False` gives the paper's MoCo form
  (positive + queue only). Regions are the image tower's patch tokens.

The momentum-contrast machinery lives in methods/momentum_contrast.py (shared with COTS).
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlp_jax.methods.momentum_contrast import MomentumContrastMethod
from vlp_jax.models.dual_encoder import image_tower, text_tower
from vlp_jax.models.heads import Temperature, TokenPoolingHead


def temperature_fields(method: ml_collections.ConfigDict) -> dict:
    """The Temperature settings of a momentum-contrast method config (`config.method`), as module fields."""
    return dict(tau=method.temperature, learn_tau=method.learn_temperature, max_logit_scale=method.max_logit_scale)


class BrivlModel(nn.Module):
    """Towers + BriVL token-pooling heads; `encode_*` return (unit-norm embedding, tower extras)."""

    model: ml_collections.ConfigDict  # config.model
    head: ml_collections.ConfigDict  # config.method.head
    tau: float  # initial (or fixed) temperature
    learn_tau: bool
    max_logit_scale: float

    def setup(self):
        model, head = self.model, self.head
        dtype = jnp.dtype(model.dtype)
        self.image_tower = image_tower(model)
        self.text_tower = text_tower(model)

        def make_head():
            return TokenPoolingHead(features=model.embed_dim, depth=head.depth, heads=head.heads,
                                    mlp_dim=head.mlp_dim, hidden=head.hidden, dtype=dtype, remat=model.remat)

        self.image_head = make_head()
        self.text_head = make_head()
        self.temperature = Temperature(self.tau, self.learn_tau, self.max_logit_scale)

    def encode_image(self, images, patch_mask=None):
        pooled, extras = self.image_tower(images, patch_mask)
        return self.image_head(extras["tokens"]), {**extras, "pooled": pooled}

    def encode_text(self, tokens, token_mask=None):
        pooled, extras = self.text_tower(tokens, token_mask)
        return self.text_head(extras["tokens"], extras["mask"]), {**extras, "pooled": pooled}

    def logit_scale(self):
        return self.temperature()

    def __call__(self, images, tokens):
        return self.encode_image(images)[0], self.encode_text(tokens)[0], self.logit_scale()


class BrivlMethod(MomentumContrastMethod):
    """BriVL: cross-modal MoCo over per-tower token-pooling heads (no AMF, no KL by default)."""

    def build_model(self) -> BrivlModel:
        return BrivlModel(self.config.model, self.cfg.head, **temperature_fields(self.cfg))
