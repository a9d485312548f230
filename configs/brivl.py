"""BriVL (WenLan): momentum encoders with per-tower token-pooling heads and a cross-modal MoCo loss.

Usage: python -m vlp_jax.main --config=configs/brivl.py:tiny
Variants: tiny | small | base | large (negatives = the all-gathered momentum keys of the global batch), and
`paper`: the base towers with the paper's queue of 9,600 paired keys, MoCo logits (positive + queue only),
τ = 0.07 and m = 0.99; `emoji`: the tiny towers on `make data-emoji`'s shards, as configs/clip.py:emoji.
"""

import ml_collections

from configs import clip, common

# Head transformer depth/heads/MLP width and the hidden width of the 2-layer MLP, per size. BriVL's released code
# uses 4 layers and 4 heads and a 2048-wide output MLP; tiny keeps one layer so it trains in minutes on a CPU.
_HEADS = {
    "tiny": dict(depth=1, heads=4, mlp_dim=192, hidden=192),
    "small": dict(depth=4, heads=4, mlp_dim=1536, hidden=2048),
    "base": dict(depth=4, heads=4, mlp_dim=2048, hidden=2048),
    "large": dict(depth=4, heads=4, mlp_dim=3072, hidden=2048),
}
PAPER_QUEUE = 9_600
PAPER_BATCH = 960  # [ours] the paper does not state its batch; the queue must hold a whole number of batches


def method_config(size: str) -> ml_collections.ConfigDict:
    """The momentum-contrast block shared by BriVL and COTS (COTS adds its terms on top)."""
    return ml_collections.ConfigDict(
        dict(
            name="brivl",
            temperature=0.07,  # fixed τ as in MoCo/BriVL; learn_temperature=True makes it a clipped parameter
            learn_temperature=False,
            max_logit_scale=100.0,
            momentum=0.99,  # θ' ← m θ' + (1 − m) θ every step
            queue_size=0,  # 0: the all-gathered global batch of momentum keys is the dictionary
            in_batch_negatives=True,  # False: MoCo logits, the positive plus queue negatives only
            kl_weight=0.0,  # task-level KL alignment of i2t and t2i (COTS)
            kl_symmetric=True,
            head=_HEADS[size],
            # Adaptive momentum filter (COTS); off for BriVL.
            amf=dict(enabled=False, alpha=1.0, decay=0.99, warmup_steps=0),
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg, extra=("paper", "emoji"))
    size = {"paper": "base", "emoji": "tiny"}.get(variant, variant)
    config = common.base_config(size)
    config.method = method_config(size)
    if variant == "paper":
        config.method.queue_size = PAPER_QUEUE
        config.method.in_batch_negatives = False
        config.train.batch_size = PAPER_BATCH
        config.eval.batch_size = PAPER_BATCH
    if variant == "emoji":
        clip.use_emoji_data(config)  # the same data, split, towers and budget as configs/clip.py:emoji
    return config
