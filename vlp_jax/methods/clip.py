"""CLIP baseline: dual encoder + learnable temperature + all-gathered symmetric InfoNCE."""

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from vlp_jax.methods.base import Batch, PyTree
from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.heads import LogitScale
from vlp_jax.objectives.contrastive import clip_loss


class ClipModel(nn.Module):
    config: ml_collections.ConfigDict  # the whole run config

    def setup(self):
        self.towers = DualEncoder(self.config.model)
        self.logit_scale = LogitScale(self.config.method.temperature_init, self.config.method.max_logit_scale)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        return {**self.towers(images, tokens), "logit_scale": self.logit_scale()}

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.towers.encode_image(images)[0]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return self.towers.encode_text(tokens)[0]


class ClipMethod:
    """Implements the Method protocol for the two-tower InfoNCE baseline."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.model = ClipModel(config)
        self.mesh = mesh

    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        variables = self.model.init(rng, batch["image"], batch["text"])
        return variables["params"], {}

    def loss(self, params, extra, batch, rng, step):
        del rng, step  # CLIP is deterministic given the batch
        out = self.model.apply({"params": params}, batch["image"], batch["text"])
        loss, metrics = clip_loss(out["image"], out["text"], out["logit_scale"], self.mesh)
        metrics["temperature"] = 1.0 / out["logit_scale"]
        return loss, (metrics, extra)

    def encode(self, params, batch):
        embeddings = {}
        if "image" in batch:
            embeddings["image"] = self.model.apply({"params": params}, batch["image"], method=ClipModel.encode_image)
        if "text" in batch:
            embeddings["text"] = self.model.apply({"params": params}, batch["text"], method=ClipModel.encode_text)
        return embeddings
