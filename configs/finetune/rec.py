"""Fine-tuning on referring expressions: which candidate box an expression names, accuracy at IoU >= 0.5 (RefCOCO).

Usage: python -m vlp_jax.main --config=configs/finetune/rec.py:tiny --config.init_from=RUN --workdir=DIR
       (variants: SIZE or SIZE,METHOD to pre-train METHOD first; see configs/finetune/common.py)
"""

import ml_collections

from configs.finetune import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return common.finetune_config(arg, "finetune", "rec")
