"""SigLIP baseline (Zhai et al., ICCV 2023): CLIP's two towers with the pairwise sigmoid loss instead of softmax
InfoNCE (objectives/sigmoid.py): a learnable logit scale t (init 10, log-parameterised) and bias b (init -10), both
from the paper; negatives all-gathered across replicas, `config.train.contrastive_chunk` bounds the live logits."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.methods.base import Batch, Method, PyTree
from vlp_jax.methods.clip import ClipMethod, ClipModel
from vlp_jax.objectives.contrastive import contrastive_blocks
from vlp_jax.objectives.sigmoid import sigmoid_loss


class SiglipBias(nn.Module):
    """The learnable logit bias b, a scalar starting at `start`."""

    start: float

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("bias", nn.initializers.constant(self.start), ())


class SiglipMethod(ClipMethod):
    """The Method protocol for the sigmoid-loss baseline; params = ClipModel's + {"bias": {"bias"}} (`encode` is
    CLIP's: the towers ignore the bias)."""

    def __init__(self, config, mesh, pretrained):
        Method.__init__(self, config, mesh, pretrained)
        method = config.method
        self.model = ClipModel(config.model, 1.0 / method.scale_init, method.max_logit_scale)
        self.bias = SiglipBias(method.bias_init)

    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        params = dict(self.model.init(rng, batch["image"], batch["text"])["params"])
        params["bias"] = self.bias.init(rng)["params"]
        return params, {}

    def embedding_loss(self, params, embeddings, constants, extra, rng, step):
        del constants, rng, step
        scale = self.logit_scale(params)
        bias = self.bias.apply({"params": params["bias"]})
        result = sigmoid_loss(embeddings["image"], embeddings["text"], scale, bias, self.mesh,
                              **contrastive_blocks(self.config.train))
        return result["loss"], ({"sigmoid_loss": result["loss"], "i2t_accuracy": result["accuracy"],
                                 "logit_scale": scale, "bias": jnp.asarray(bias)}, extra)
