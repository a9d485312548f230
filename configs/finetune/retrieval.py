"""Fine-tuning for image-text retrieval: the CLIP objective on a pre-trained run's towers (and its projections
where it has plain ones: CLIP, SigLIP, COTS, CMAL), scored by retrieval R@1/5/10 (and the rest of the two-tower
suite).

Usage: python -m vlp_jax.main --config=configs/finetune/retrieval.py:tiny --config.init_from=RUN --workdir=DIR
       (variants: SIZE or SIZE,METHOD to pre-train METHOD first; see configs/finetune/common.py)
"""

import ml_collections

from configs import common as presets
from configs.finetune import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.finetune_config(arg, "finetune_retrieval", "")
    config.method.update(dict(temperature_init=0.07, max_logit_scale=100.0))  # CLIP's
    config.eval.evaluators = presets.default_evaluators()
    return config
