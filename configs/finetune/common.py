"""What the fine-tuning configs share (configs/finetune/{ve,vqa,rec,retrieval}.py).

Usage, fine-tuning an existing pre-training run (any of clip, siglip, brivl, cots, cookie, cmal; its towers'
shapes and tokenizer are taken from it):

    python -m vlp_jax.main --config=configs/finetune/ve.py:tiny --config.init_from=RUN --workdir=DIR

From scratch: leave init_from empty. Pre-training and fine-tuning as one command (the pre-training is a stage,
trained into DIR/pretrain and reused when finished): `--config=configs/finetune/ve.py:tiny,clip`. Frozen towers:
`--config.train.param_groups.backbone.frozen=True`; their own learning rate:
`--config.train.param_groups.backbone.lr_multiplier=0.1`.
"""

import importlib

import ml_collections

from configs import common

PRETRAIN_METHODS = ("clip", "siglip", "brivl", "cots", "cookie", "cmal")
# Fusion encoder per size for the two-stream methods (a CMAL run brings its own unified encoder): width, depth,
# heads, mlp_dim. A few layers: it only has to relate the towers' tokens (ours).
_FUSION = {
    "tiny": (96, 2, 4, 192),
    "small": (384, 2, 6, 1536),
    "base": (768, 4, 12, 3072),
    "large": (1024, 4, 16, 4096),
}
# Fine-tuning budgets per size: steps, batch, peak lr, warmup (shorter and gentler than pre-training).
_SCALE = {
    "tiny": dict(steps=300, batch=128, lr=5e-4, warmup=30),
    "small": dict(steps=10_000, batch=256, lr=1e-4, warmup=500),
    "base": dict(steps=20_000, batch=256, lr=5e-5, warmup=1_000),
    "large": dict(steps=20_000, batch=256, lr=3e-5, warmup=1_000),
}


def parse(arg: str | None) -> tuple[str, str]:
    """'tiny' or 'tiny,clip' -> (size, the method to pre-train first as a stage, or '')."""
    size, _, pretrain = (arg or "").partition(",")
    if pretrain and pretrain not in PRETRAIN_METHODS:
        raise ValueError(f"config variant {arg!r}: {pretrain!r} is not a pre-training method; use one of "
                         f"{', '.join(PRETRAIN_METHODS)}, e.g. --config=configs/finetune/ve.py:tiny,clip")
    return common.parse_variant(size or None), pretrain


def finetune_config(arg: str | None, method: str, task: str) -> ml_collections.ConfigDict:
    """The run config of fine-tuning `method` ("finetune" or "finetune_retrieval") on `task`."""
    size, pretrain = parse(arg)
    config = common.base_config(size)
    scale = _SCALE[size]
    config.train.update(dict(steps=scale["steps"], batch_size=scale["batch"], learning_rate=scale["lr"],
                             warmup_steps=scale["warmup"], log_every=min(config.train.log_every, 50)))
    config.eval.every = config.train.steps  # the downstream figures at the end (and on the subset, --config.eval.every)
    config.checkpoint.every = config.train.steps
    config.method = ml_collections.ConfigDict(dict(name=method))
    config.data.task = task
    width, depth, heads, mlp_dim = _FUSION[size]
    config.finetune = ml_collections.ConfigDict(dict(
        backbone="",  # the method of the run init_from names (set when the run starts)
        pretrain=pretrain,  # the method pre-trained first as a stage (variant 'SIZE,METHOD'); '' = none
        pretrain_train={},  # overrides of that stage's config.train (e.g. steps, batch_size); {} = its preset's
        fusion=dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim),
        head_expansion=2,  # VE/VQA head: hidden width = fusion width x this
        region_samples=2,  # RoI-align sample points per box side (REC candidates)
        max_answers=3129,  # VQA vocabulary from real data: the most frequent training answers (VQA v2's usual 3,129)
    ))
    # The towers are one parameter group: freeze them or give them their own learning rate from the command line.
    config.train.param_groups = ml_collections.ConfigDict(dict(
        backbone=dict(pattern="towers/.*", frozen=False, lr_multiplier=1.0, weight_decay=-1.0)))
    config.eval.evaluators = ml_collections.ConfigDict()  # the method adds its task's evaluator
    if pretrain:
        config.stages = ml_collections.ConfigDict(dict(pretrain=dict(
            config="configs.finetune.common:pretraining", output="init_from",
            description=f"{pretrain} pre-training")))
    return config


def pretraining(run_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The pre-training stage of a chained fine-tuning run: `configs/<finetune.pretrain>.py` at the run's size,
    with its towers (config.model), seed and data, and `finetune.pretrain_train`'s overrides of its training."""
    config = importlib.import_module(f"configs.{run_config.finetune.pretrain}").get_config(run_config.size)
    config.seed = run_config.seed
    config.model = run_config.model
    for key in ("train_sources", "eval_sources", "world", "train_size", "eval_size", "tokenizer"):
        config.data[key] = run_config.data[key]
    config.train.update(run_config.finetune.pretrain_train.to_dict())
    return config
