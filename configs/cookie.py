"""COOKIE: a weight-sharing transformer head on both towers, cross-modal contrast, and visual / textual knowledge
sharing with a teacher per side (momentum, frozen or none).

Usage: python -m vlp_jax.main --config=configs/cookie.py:tiny --workdir=DIR
A frozen teacher is another run's encoder:
  --config.method.teacher.image=frozen --config.method.teacher.image_run=CLIP_RUN
  --config.train.param_groups='{"teachers": {"pattern": "(visual|textual)_teacher/.*", "frozen": True}}'
(and for the text side its tokenizer: --config.data.tokenizer.path=CLIP_RUN/tokenizer.model); from Python,
`use_frozen_teachers(config, run_dir)` sets all of it.
Variants: tiny | small | base (default; ViT-B/16) | large | emoji (the tiny towers on `make data-emoji`'s shards,
as configs/clip.py:emoji).
"""

import ml_collections
from etils import epath

from configs import clip, common
from vlp_jax.data.pipeline import TOKENIZER_FILE

# Shared head per size [ours]: width, blocks, attention heads, MLP width. The paper does not give its depth; 2 is
# our default and the depth sweep (1, 2, 4) is in docs/results/cookie.md.
_HEADS = {
    "tiny": dict(width=96, depth=2, heads=4, mlp_dim=192),
    "small": dict(width=384, depth=2, heads=6, mlp_dim=1536),
    "base": dict(width=512, depth=2, heads=8, mlp_dim=2048),
    "large": dict(width=768, depth=2, heads=12, mlp_dim=3072),
}
FROZEN_GROUP = {"pattern": "(visual|textual)_teacher/.*", "frozen": True}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.parse_variant(arg, extra=("emoji",))
    size = "tiny" if variant == "emoji" else variant
    config = common.base_config(size)
    config.method = ml_collections.ConfigDict(
        dict(
            name="cookie",
            head=dict(**_HEADS[size], pool="mean"),  # pool: 'mean' over valid tokens or a learned 'cls' token
            temperature=0.07,  # every term's 1/τ starts at 1/0.07 (CLIP)
            learn_temperature=True,
            max_logit_scale=100.0,
            # Loss weights of the three terms; 0 turns a knowledge-sharing term (and its teacher) off.
            weights=dict(cross=1.0, visual=1.0, textual=1.0),
            # Teacher per side: 'momentum' (EMA of the student), 'frozen' (another run: *_run, a CLIP/COTS run, or
            # a VQ run for images) or 'none'.
            teacher=dict(image="momentum", text="momentum", image_run="", text_run=""),
            momentum=0.99,  # θ' ← m θ' + (1 − m) θ every step (momentum teachers)
            # The teacher sees a second view: another crop of the image / another caption of it (off = the
            # student's own input).
            second_view=dict(image=False, text=False),
        )
    )
    if variant == "emoji":
        clip.use_emoji_data(config)  # the same data, split, towers and budget as configs/clip.py:emoji
    return config


def use_frozen_teachers(config: ml_collections.ConfigDict, run_dir: str,
                        modalities: tuple[str, ...] = ("image", "text")) -> ml_collections.ConfigDict:
    """Makes `run_dir` (a CLIP or COTS run; a VQ run for images) the frozen teacher of `modalities`: sets the
    teacher kinds and runs, the frozen parameter group, and for text the teacher's tokenizer."""
    for modality in modalities:
        config.method.teacher[modality] = "frozen"
        config.method.teacher[f"{modality}_run"] = run_dir
    groups = dict(config.train.param_groups)
    groups["teachers"] = FROZEN_GROUP
    config.train.param_groups = groups
    if "text" in modalities:
        config.data.tokenizer.path = str(epath.Path(run_dir) / TOKENIZER_FILE)
    return config
