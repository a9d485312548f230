"""BriVL (WenLan, arXiv 2103.06561): two towers with per-tower heads and a cross-modal MoCo loss.

What comes from where (see ../shared/METHODS.md):
- [code] Per-tower heads: a small transformer over the tower's token features (region/patch or word), masked mean
  pooling, a 2-layer MLP into the joint space, L2 normalisation. Momentum update θ' ← m·θ' + (1 − m)·θ before the
  keys are computed; i2t logits score v against the momentum text keys, t2i score t against the momentum image
  keys, τ = 0.07, m = 0.99; queues of 9,600 keys enqueued together.
- [ours] Negatives default to the all-gathered momentum keys of the global batch (the batch is the dictionary);
  the paired queue is optional (`queue_size > 0`), and `in_batch_negatives=False` gives the paper's MoCo form
  (positive + queue only). Regions are the image tower's patch tokens.

`MomentumContrastMethod` is the instance-level machinery (EMA encoders, keys, AMF weights, queue) shared with
COTS, which adds its token- and task-level terms through `extra_terms`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vlp_jax.methods.base import Batch, PyTree
from vlp_jax.models.dual_encoder import image_tower, text_tower
from vlp_jax.models.heads import LogitScale, TokenPoolingHead
from vlp_jax.objectives import momentum
from vlp_jax.objectives.contrastive import contrastive_loss


class Temperature(nn.Module):
    """1/τ: a learnable clipped scale (CLIP-style) or the fixed MoCo constant, per `config.method`."""

    config: ml_collections.ConfigDict  # config.method

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.config
        if cfg.learn_temperature:
            return LogitScale(cfg.temperature, cfg.max_logit_scale, name="scale")()
        return jnp.float32(1.0 / cfg.temperature)


class BrivlModel(nn.Module):
    """Towers + BriVL token-pooling heads; `encode_*` return (unit-norm embedding, tower extras)."""

    config: ml_collections.ConfigDict  # the whole run config

    def setup(self):
        model, head = self.config.model, self.config.method.head
        dtype = jnp.dtype(model.dtype)
        self.image_tower = image_tower(model)
        self.text_tower = text_tower(model)

        def make_head():
            return TokenPoolingHead(features=model.embed_dim, depth=head.depth, heads=head.heads,
                                    mlp_dim=head.mlp_dim, hidden=head.hidden, dtype=dtype, remat=model.remat)

        self.image_head = make_head()
        self.text_head = make_head()
        self.temperature = Temperature(self.config.method)

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


class MomentumContrastMethod:
    """Instance-level momentum contrast: online queries v, t against momentum keys v', t' (all-gathered over the
    global batch, plus the optional paired queue), with adaptive-momentum-filter weights.

    `extra` = {"ema": momentum params, "filter": AMF statistics, "queue": paired queue (if queue_size > 0)}.
    Subclasses override `build_model`, `online_only` (top-level parameter groups the EMA does not track),
    `init_inputs` and `extra_terms`.
    """

    online_only: tuple[str, ...] = ("temperature",)

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config = config
        self.cfg = config.method
        self.mesh = mesh
        momentum.check_queue_size(self.cfg.queue_size, config.train.batch_size)
        self.model = self.build_model()

    # -- protocol ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        params = self.model.init(rng, *self.init_inputs(batch))["params"]
        extra = {"ema": jax.tree.map(jnp.copy, self.tracked(params)), "filter": momentum.init_filter()}
        if self.cfg.queue_size:
            extra["queue"] = momentum.init_queue(self.cfg.queue_size, self.config.model.embed_dim)
        return params, extra

    def loss(self, params, extra, batch, rng, step):
        cfg = self.cfg
        ema = momentum.ema_update(extra["ema"], self.tracked(params), cfg.momentum)
        image, image_aux = self._apply(params, "encode_image", batch["image"])
        text, text_aux = self._apply(params, "encode_text", batch["text"])
        image_keys = jax.lax.stop_gradient(self._apply(ema, "encode_image", batch["image"])[0])
        text_keys = jax.lax.stop_gradient(self._apply(ema, "encode_text", batch["text"])[0])
        similarity = jnp.sum(image_keys * text_keys, axis=-1)  # momentum positive-pair similarity [B]
        weights, filter_stats, metrics = momentum.adaptive_filter(extra["filter"], similarity, step, cfg.amf)
        queue = extra.get("queue")
        out = contrastive_loss(
            image, text, self._apply(params, "logit_scale"), self.mesh,
            image_keys=image_keys, text_keys=text_keys,
            queue=None if queue is None else {k: queue[k] for k in ("image", "text", "valid")},
            weights=weights, in_batch_negatives=cfg.in_batch_negatives,
            with_kl=cfg.kl_weight > 0, kl_symmetric=cfg.kl_symmetric,
        )
        loss = out["loss"]
        metrics.update({"instance_loss": out["loss"], "i2t_accuracy": out["accuracy"],
                        "temperature": 1.0 / self._apply(params, "logit_scale")})
        if cfg.kl_weight > 0:
            loss += cfg.kl_weight * out["kl"]
            metrics["kl_loss"] = out["kl"]
        extra_loss, extra_metrics = self.extra_terms(params, extra, batch, rng, weights, image_aux, text_aux)
        loss += extra_loss
        metrics.update(extra_metrics)
        if "noisy" in batch:
            metrics.update(momentum.filter_quality(weights, batch["noisy"]))
        new_extra = {**extra, "ema": ema, "filter": filter_stats}
        if queue is not None:
            new_extra["queue"] = momentum.enqueue(queue, image_keys, text_keys, weights > 0)
        return loss, (metrics, new_extra)

    def encode(self, params, batch):
        embeddings = {}
        if "image" in batch:
            embeddings["image"] = self._apply(params, "encode_image", batch["image"])[0]
        if "text" in batch:
            embeddings["text"] = self._apply(params, "encode_text", batch["text"])[0]
        return embeddings

    # -- hooks ---------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The flax model; it must define encode_image, encode_text and logit_scale."""
        return BrivlModel(self.config)

    def init_inputs(self, batch: Batch) -> tuple:
        """Arguments of the model's __call__ that create every parameter."""
        return batch["image"], batch["text"]

    def extra_terms(self, params, extra, batch, rng, weights, image_aux, text_aux):
        """Loss terms beyond the instance level: (weighted loss to add, metrics). BriVL has none."""
        del params, extra, batch, rng, weights, image_aux, text_aux
        return 0.0, {}

    # -- helpers -------------------------------------------------------------------------------------------------
    def tracked(self, params: PyTree) -> PyTree:
        """The parameter groups the momentum encoder mirrors (everything but `online_only`)."""
        return {name: value for name, value in params.items() if name not in self.online_only}

    def _apply(self, params, method: str, *args):
        return self.model.apply({"params": params}, *args, method=getattr(type(self.model), method))


class BrivlMethod(MomentumContrastMethod):
    """BriVL: cross-modal MoCo over per-tower token-pooling heads (no AMF, no KL by default)."""
