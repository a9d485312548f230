"""CMAL: anchor points, a cross-modal associative prompt (anchor masking + swap filling), a unified semantic
encoder over [text tokens ; regions] and associative mapping classification (AMC), with image-text contrastive,
hard-negative matching and MLM as switchable auxiliary terms (vlp_jax/methods/cmal.py says which is the paper's).

Usage: python -m vlp_jax.main --config=configs/cmal.py:tiny --workdir=DIR
Variants: tiny | small | base (default; ViT-B/16) | large.
"""

import ml_collections

from configs import common

# Unified semantic encoder per size: (width, depth, heads, mlp_dim).
_UNIFIED = {
    "tiny": (96, 2, 4, 192),
    "small": (384, 4, 6, 1536),
    "base": (768, 6, 12, 3072),
    "large": (1024, 6, 16, 4096),
}
# Re-ranked candidates per query during retrieval: the two-tower top-k scored again by the unified encoder.
_RERANK_K = {"tiny": 8, "small": 16, "base": 16, "large": 16}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = common.parse_variant(arg)
    config = common.base_config(size)
    width, depth, heads, mlp_dim = _UNIFIED[size]
    config.method = ml_collections.ConfigDict(
        dict(
            name="cmal",
            temperature_init=0.07,  # image-text contrastive: logit scale starts at 1/0.07 (CLIP)
            max_logit_scale=100.0,
            unified=dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim),
            regions=dict(
                samples=2,  # RoI-align sample points per box side
                patch_fallback=True,  # an example without boxes uses its patch tokens as regions
            ),
            anchors=dict(
                source="tags",  # "tags": normalised tags ∩ caption words; "similarity": tag-free detector
                threshold=0.5,  # tag-free: cosine a mutual-nearest word/region pair must exceed
                # Word↔region InfoNCE in the two hypersphere spaces on the tag anchors (trains the tag-free
                # detector's spaces); 0 = off.
                align_weight=0.5,
                align_temperature=0.1,
            ),
            swap_fraction=0.5,  # share of anchors whose word and region slots exchange features
            amc=dict(
                weight=1.0,
                target="pairing",  # "pairing": which anchor of the other modality; "word": the word's token id
            ),
            itc=dict(weight=1.0),  # image-text contrastive on the uni-modal towers, negatives all-gathered
            itm=dict(
                weight=1.0,
                mining="sample",  # hard negatives from the gathered similarities: "sample" (softmax) | "hardest"
            ),
            mlm=dict(weight=1.0, ratio=0.15, mask_fraction=0.8, random_fraction=0.1),
            rerank=dict(k=_RERANK_K[size]),
        )
    )
    return config
