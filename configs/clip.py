"""CLIP baseline: two towers, symmetric InfoNCE, learnable temperature, negatives all-gathered across replicas.

Usage: python -m vlp_jax.main --config=configs/clip.py:tiny
       python -m vlp_jax.main --config=configs/clip.py:emoji   (real data: run `make data-emoji` first)
"""

import ml_collections

from configs import common

# Shards written by `make data-emoji`, relative to the repository root (where make and the commands run).
EMOJI_SHARDS = "data/emoji/shards"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg, extra=("emoji",))
    config = common.base_config("tiny" if variant == "emoji" else variant)
    config.method = ml_collections.ConfigDict(
        dict(
            name="clip",
            temperature_init=0.07,  # logit scale starts at 1/0.07
            max_logit_scale=100.0,  # the learnable scale is clipped here (CLIP)
        )
    )
    if variant == "emoji":
        use_emoji_data(config)
    return config


def use_emoji_data(config: ml_collections.ConfigDict) -> None:
    """The tiny towers on the emoji shards: 1,721 train / 190 eval emoji in three art styles, 32 px, where any
    style of the right emoji is a retrieval hit; the tokenizer is trained on the emoji captions."""
    config.data.train_sources = f"{EMOJI_SHARDS}:train"
    config.data.eval_sources = f"{EMOJI_SHARDS}:eval"
    config.data.group_label = "emoji"  # records' labels["emoji"]: every art style of one emoji is one group
    # The tiny preset's crop (0.8-1 of the area, aspect 0.9-1.1) was chosen on these icons.
    # Captions are names and keyword lists (median 3 words, p90 11): a larger vocabulary, longer texts.
    config.model.text.vocab_size = 2048
    config.model.text.max_len = 32
    config.data.tokenizer.vocab_size = 2048
    # 5,163 training images: batch 128 is 40 steps an epoch, 1,500 steps about 37 epochs (~25 min on 2 CPU cores).
    config.train.update(dict(steps=1500, batch_size=128, warmup_steps=100, log_every=100))
    config.eval.update(dict(every=500, subset_size=0))  # all 570 eval images
    config.checkpoint.every = 500
