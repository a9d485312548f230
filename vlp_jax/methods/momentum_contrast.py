"""Instance-level momentum contrast, shared by BriVL, COTS and COOKIE's momentum teachers.

Online queries v, t score momentum keys v', t' (EMA encoders, θ' ← m·θ' + (1 − m)·θ before the keys are
computed), all-gathered over the global batch and optionally followed by a paired queue, with per-pair weights
from the adaptive momentum filter (objectives/momentum.py) and the optional KL alignment of the two directions.
`extra` = {"ema": momentum params, "filter": AMF statistics, "queue": paired queue (if queue_size > 0)}.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.methods.base import Batch, Method, PyTree
from vlp_jax.objectives import momentum
from vlp_jax.objectives.contrastive import contrastive_loss


class MomentumContrastMethod(Method):
    """Subclasses override `build_model` (a flax model with encode_image, encode_text and logit_scale),
    `online_only` (top-level parameter groups the EMA does not track), `init_inputs`, and the Method protocol's
    `example_inputs` / `example_terms` for terms beyond the instance level."""

    online_only: tuple[str, ...] = ("temperature",)

    def __init__(self, config, mesh, pretrained):
        super().__init__(config, mesh, pretrained)
        self.cfg = config.method
        momentum.check_queue_size(self.cfg.queue_size, config.train.batch_size)
        self.model = self.build_model()

    # -- protocol ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        params = self.model.init(rng, *self.init_inputs(batch))["params"]
        extra = {"ema": jax.tree.map(jnp.copy, self.tracked(params)), "filter": momentum.init_filter()}
        if self.cfg.queue_size:
            extra["queue"] = momentum.init_queue(self.cfg.queue_size, self.config.model.embed_dim)
        return params, extra

    # -- the loss: Method.loss's default (embed, embed_constants, embedding_loss, example terms) ---------------------
    def embed(self, params, batch):
        """The online queries."""
        return {"image": self.apply(params, "encode_image", batch["image"])[0],
                "text": self.apply(params, "encode_text", batch["text"])[0]}

    def embed_constants(self, params, extra, batch, step):
        """The momentum keys, from the EMA encoders updated with this step's parameters (θ' ← m·θ' + (1 − m)·θ)."""
        del step
        ema = momentum.ema_update(extra["ema"], self.tracked(params), self.cfg.momentum)
        constants = {"image_keys": jax.lax.stop_gradient(self.apply(ema, "encode_image", batch["image"])[0]),
                     "text_keys": jax.lax.stop_gradient(self.apply(ema, "encode_text", batch["text"])[0])}
        if "noisy" in batch:  # ground-truth noise flags: scored against the filter, never used by the loss
            constants["noisy"] = batch["noisy"]
        return constants

    def filter_weights(self, extra, constants, step):
        """The adaptive momentum filter's per-pair weights from the keys' positive similarities: (weights, new
        statistics, metrics)."""
        similarity = jnp.sum(constants["image_keys"] * constants["text_keys"], axis=-1)  # [B]
        return momentum.adaptive_filter(extra["filter"], similarity, step, self.cfg.amf)

    def embedding_loss(self, params, embeddings, constants, extra, rng, step):
        """The instance-level term over the global batch (and queue), with the AMF weights; the EMA, the filter's
        statistics and the queue advance here."""
        cfg = self.cfg
        weights, filter_stats, metrics = self.filter_weights(extra, constants, step)
        queue = extra.get("queue")
        logit_scale = self.apply(params, "logit_scale")
        out = contrastive_loss(
            embeddings["image"], embeddings["text"], logit_scale, self.mesh, keys_a=constants["image_keys"],
            keys_b=constants["text_keys"], queue=None if queue is None else momentum.as_pairs(queue),
            weights=weights, in_batch_negatives=cfg.in_batch_negatives,
            with_kl=cfg.kl_weight > 0, kl_symmetric=cfg.kl_symmetric,
        )
        loss = out["loss"]
        metrics.update(instance_loss=out["loss"], i2t_accuracy=out["accuracy"], temperature=1.0 / logit_scale)
        if "noisy" in constants:
            metrics.update(momentum.filter_quality(weights, constants["noisy"]))
        if cfg.kl_weight > 0:
            loss += cfg.kl_weight * out["kl"]
            metrics["kl_loss"] = out["kl"]
        ema = momentum.ema_update(extra["ema"], self.tracked(jax.lax.stop_gradient(params)), cfg.momentum)
        new_extra = {**extra, "ema": ema, "filter": filter_stats}
        if queue is not None:
            new_extra["queue"] = momentum.enqueue(queue, constants["image_keys"], constants["text_keys"], weights > 0)
        return loss, (metrics, new_extra)

    def encode(self, params, batch):
        embeddings = {}
        if "image" in batch:
            embeddings["image"] = self.apply(params, "encode_image", batch["image"])[0]
        if "text" in batch:
            embeddings["text"] = self.apply(params, "encode_text", batch["text"])[0]
        return embeddings

    # -- hooks ---------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The flax model; it must define encode_image, encode_text and logit_scale."""
        raise NotImplementedError

    def init_inputs(self, batch: Batch) -> tuple:
        """Arguments of the model's __call__ that create every parameter."""
        return batch["image"], batch["text"]

    # -- helpers -------------------------------------------------------------------------------------------------
    def tracked(self, params: PyTree) -> PyTree:
        """The parameter groups the momentum encoder mirrors (everything but `online_only`)."""
        return {name: value for name, value in params.items() if name not in self.online_only}

    def apply(self, params, method: str, *args):
        """Calls the model's method `method` with `params`."""
        return self.model.apply({"params": params}, *args, method=getattr(type(self.model), method))
