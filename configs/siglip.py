"""SigLIP baseline: CLIP's towers with the pairwise sigmoid loss (vlp_jax/methods/siglip.py).

Usage: python -m vlp_jax.main --config=configs/siglip.py:tiny
       python -m vlp_jax.main --config=configs/siglip.py:emoji   (real data: run `make data-emoji` first)
"""

import ml_collections

from configs import clip, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg, extra=("emoji",))
    config = common.base_config("tiny" if variant == "emoji" else variant)
    config.method = ml_collections.ConfigDict(
        dict(
            name="siglip",
            scale_init=10.0,  # t = exp(t'), t' starts at log 10 (SigLIP)
            bias_init=-10.0,  # b starts at -10 (SigLIP): every pair starts as a confident negative
            max_logit_scale=100.0,
        )
    )
    if variant == "emoji":
        clip.use_emoji_data(config)
    return config
