"""CLIP baseline: dual encoder + learnable temperature + all-gathered symmetric InfoNCE."""

import flax.linen as nn
import jax
import ml_collections

from vlp_jax.methods.base import Batch, Method, PyTree
from vlp_jax.models.dual_encoder import DualEncoder
from vlp_jax.models.heads import LogitScale
from vlp_jax.objectives.contrastive import clip_loss, contrastive_blocks


class ClipModel(nn.Module):
    model: ml_collections.ConfigDict  # config.model
    temperature_init: float
    max_logit_scale: float

    def setup(self):
        self.towers = DualEncoder(self.model)
        self.logit_scale = LogitScale(self.temperature_init, self.max_logit_scale)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        return {**self.towers(images, tokens), "logit_scale": self.logit_scale()}

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.towers.encode_image(images)[0]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return self.towers.encode_text(tokens)[0]


class ClipMethod(Method):
    """Implements the Method protocol for the two-tower InfoNCE baseline."""

    def __init__(self, config, mesh, pretrained):
        super().__init__(config, mesh, pretrained)
        self.model = ClipModel(config.model, config.method.temperature_init, config.method.max_logit_scale)

    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        variables = self.model.init(rng, batch["image"], batch["text"])
        return variables["params"], {}

    def embed(self, params, batch):
        out = self.model.apply({"params": params}, batch["image"], batch["text"])
        return {"image": out["image"], "text": out["text"]}

    def logit_scale(self, params) -> jax.Array:
        return self.model.apply({"params": params}, method=lambda module: module.logit_scale())

    def embedding_loss(self, params, embeddings, constants, extra, rng, step):
        del constants, rng, step
        scale = self.logit_scale(params)
        loss, metrics = clip_loss(embeddings["image"], embeddings["text"], scale, self.mesh,
                                  **contrastive_blocks(self.config.train))
        return loss, ({**metrics, "temperature": 1.0 / scale}, extra)

    def encode(self, params, batch):
        embeddings = {}
        if "image" in batch:
            embeddings["image"] = self.model.apply({"params": params}, batch["image"], method=ClipModel.encode_image)
        if "text" in batch:
            embeddings["text"] = self.model.apply({"params": params}, batch["text"], method=ClipModel.encode_text)
        return embeddings
