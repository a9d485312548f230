"""Fine-tuning on visual entailment: a hypothesis about the image is entailed, neutral or contradicted (SNLI-VE).

Usage: python -m vlp_jax.main --config=configs/finetune/ve.py:tiny --config.init_from=RUN --workdir=DIR
       (variants: SIZE or SIZE,METHOD to pre-train METHOD first; see configs/finetune/common.py)
"""

import ml_collections

from configs.finetune import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return common.finetune_config(arg, "finetune", "ve")
