"""CLIP baseline: two towers, symmetric InfoNCE, learnable temperature, negatives all-gathered across replicas.

Usage: python -m vlp_jax.main --config=configs/clip.py:tiny
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = common.parse_variant(arg)
    config = common.base_config(size)
    config.method = ml_collections.ConfigDict(
        dict(
            name="clip",
            temperature_init=0.07,  # logit scale starts at 1/0.07
            max_logit_scale=100.0,  # the learnable scale is clipped here (CLIP)
        )
    )
    return config
