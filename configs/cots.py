"""COTS: momentum contrast + masked vision-language modelling (no cross-stream module) + KL task alignment +
adaptive momentum filter.

Usage: python -m vlp_jax.main --config=configs/cots.py:tiny --workdir=DIR
Without `method.mvm.tokenizer`, the run first trains a visual tokenizer (configs/vq.py) into DIR/tokenizer: the
`tokenizer` stage declared here (vlp_jax/stages.py).
Variants: tiny | small | base (default; ViT-B/16, the paper scale) | large | emoji (the tiny towers on
`make data-emoji`'s shards, as configs/clip.py:emoji).
"""

import ml_collections

from configs import brivl, clip, common

# Visual-tokenizer codebook per size (BEiT's dVAE uses 8192 codes at 224 px); tiny's 4×4 grid needs few.
_CODEBOOK = {"tiny": 256, "small": 8192, "base": 8192, "large": 8192}
# AMF warm-up: the momentum similarities mean little until the encoders have learned something.
_AMF_WARMUP = {"tiny": 100, "small": 2_000, "base": 5_000, "large": 10_000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg, extra=("emoji",))
    size = "tiny" if variant == "emoji" else variant
    config = common.base_config(size)
    method = brivl.method_config(size)
    del method["head"]  # COTS projects each tower's pooled feature; no BriVL token-pooling head
    method.name = "cots"
    method.kl_weight = 1.0
    method.amf = ml_collections.ConfigDict(
        dict(enabled=True, alpha=1.0, decay=0.99, warmup_steps=_AMF_WARMUP[size])
    )
    method.mlm = ml_collections.ConfigDict(
        dict(weight=1.0, ratio=0.15, mask_fraction=0.8, random_fraction=0.1, fusion="add")
    )
    method.mvm = ml_collections.ConfigDict(
        dict(
            weight=1.0,
            ratio=0.4,  # fraction of patches masked, in blocks
            min_block_fraction=0.08,  # smallest block, as a fraction of the patch grid (BEiT: 16 of 196)
            max_aspect=3.0,
            attempts=20,  # blocks drawn per image; those that would exceed `ratio` are rejected
            fusion="add",
            codebook_size=_CODEBOOK[size],
            # A configs/vq.py run directory; "" = the tokenizer stage trains one first into <workdir>/tokenizer;
            # "random" = untrained (benchmarks and tests only).
            tokenizer="",
            tokenizer_steps=-1,  # -1: ceil(tokenizer_fraction × train.steps)
            tokenizer_fraction=0.5,
            tokenizer_batch_size=-1,  # -1: config.train.batch_size
        )
    )
    config.method = method
    config.stages.tokenizer = ml_collections.ConfigDict(
        dict(config="configs.vq:for_cots", output="method.mvm.tokenizer", description="visual tokenizer")
    )
    if variant == "emoji":
        clip.use_emoji_data(config)  # the same data, split, towers and budget as configs/clip.py:emoji
    return config
