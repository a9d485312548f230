"""Text tower: token + position embedding, bidirectional pre-LN encoder over non-pad tokens, EOS/CLS/mean pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import Dtype, Encoder, MaskEmbedding, constrain, partitioned


class TextTransformer(nn.Module):
    """tokens int32 [b, l] (0 = pad) -> (pooled [b, width], {"tokens": [b, l, width], "mask": [b, l]}).

    Pooling 'eos' takes the last non-pad token (the EOS the tokenizer appends), 'cls' the first (BOS),
    'mean' the average over non-pad tokens. `token_mask` bool [b, l] replaces those token embeddings with a
    learned mask embedding (masked language modelling; the tokenizer needs no [MASK] id); the parameter exists only
    in models initialised with a mask. `causal`: each token attends only to itself and earlier tokens (CLIP's text
    tower; with 'eos' pooling the pooled token then sees the whole text).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    pool: str = "eos"
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    scan: bool = False  # the encoder's blocks as one nn.scan (layers.Encoder)
    attention: str = "xla"  # layers.ATTENTION
    causal: bool = False
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(
        self, tokens: jax.Array, token_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"text has {tokens.shape[1]} tokens but config.model.text.max_len is {self.max_len}"
            )
        if self.pool not in ("eos", "cls", "mean"):
            raise ValueError(f"config.model.text.pool={self.pool!r}; use 'eos', 'cls' or 'mean'")
        mask = tokens != 0  # [b, l]
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=partitioned(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
            name="token_embed",
        )
        pos = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(stddev=0.01), (None, "length", "embed")),
            (1, self.max_len, self.width),
        )
        x = embed(tokens).astype(self.dtype)
        if token_mask is not None:
            x = MaskEmbedding(name="mask_embedding")(x, token_mask)
        x = x + pos[:, : tokens.shape[1]].astype(self.dtype)
        x = constrain(x, ("batch", "act_len", "act_embed"))
        x = Encoder(self.depth, self.heads, self.mlp_dim, self.dtype, self.remat, self.activation, self.layer_norm_eps,
                    self.scan, self.causal, self.attention, name="encoder")(x, mask)
        if self.pool == "eos":
            last = jnp.maximum(mask.sum(axis=1) - 1, 0)  # [b] index of the last real token
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        elif self.pool == "cls":
            pooled = x[:, 0]
        else:
            weights = mask[..., None].astype(x.dtype)
            pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return pooled, {"tokens": x, "mask": mask}
