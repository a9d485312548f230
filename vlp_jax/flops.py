"""FLOP counting and model FLOPs utilisation (MFU).

A matmul [m, k] × [k, n] costs 2·m·k·n FLOPs (a multiply-accumulate is two FLOPs; papers quoting ViT-B/16 at
"17.5 GFLOPs" count multiply-accumulates). The FLOPs behind MFU are those of the train step's own program
(`step_flops`: XLA's count of the lowered, not yet partitioned or rematerialised step over the global batch), so
every method is charged for what it computes: BriVL's and COTS's momentum encoders, COTS's masked passes. The
closed-form CLIP count (`train_flops_per_step`: towers and logits, matmuls only) is the fallback and the check.
"""

import ml_collections

# A training step costs the forward pass plus a backward pass of about twice the forward.
TRAIN_FLOPS_PER_FORWARD = 3
IMAGE_CHANNELS = 3  # RGB pixels per patch position

def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Forward FLOPs of a transformer encoder over one sequence of `tokens` tokens (independent of heads)."""
    t, d, m = tokens, width, mlp_dim
    qkv = 2 * t * d * 3 * d
    scores = 2 * t * t * d  # q·kᵀ over all heads
    weighted_values = 2 * t * t * d  # softmax(scores)·v
    out_proj = 2 * t * d * d
    mlp = 2 * t * d * m * 2  # up and down projections
    return float(depth * (qkv + scores + weighted_values + out_proj + mlp))


def image_tower_flops(image: ml_collections.ConfigDict, embed_dim: int) -> float:
    """Forward FLOPs of the ViT for one image: patch embedding, encoder, projection to embed_dim."""
    num_patches = (image.image_size // image.patch_size) ** 2
    tokens = num_patches + (1 if image.get("pool") == "cls" else 0)
    patch_embed = 2 * num_patches * (image.patch_size**2 * IMAGE_CHANNELS) * image.width
    projection = 2 * image.width * embed_dim
    return patch_embed + encoder_flops(tokens, image.width, image.depth, image.mlp_dim) + projection


def text_tower_flops(text: ml_collections.ConfigDict, embed_dim: int) -> float:
    """Forward FLOPs of the text transformer for one caption of max_len tokens, and its projection."""
    projection = 2 * text.width * embed_dim
    return encoder_flops(text.max_len, text.width, text.depth, text.mlp_dim) + projection


def tower_encode_flops(model_config: ml_collections.ConfigDict) -> dict[str, float]:
    """Forward FLOPs of embedding one image / one text with the two towers and their projections."""
    return {"image": image_tower_flops(model_config.image, model_config.embed_dim),
            "text": text_tower_flops(model_config.text, model_config.embed_dim)}


def clip_forward_flops_per_pair(model_config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of both towers for one image-text pair; model_config is `config.model`."""
    embed_dim = model_config.embed_dim
    return image_tower_flops(model_config.image, embed_dim) + text_tower_flops(model_config.text, embed_dim)


def contrastive_logits_flops(global_batch: int, embed_dim: int) -> float:
    """Forward FLOPs of the [B, B] similarity logits, computed once per direction (image→text, text→image)."""
    return 2.0 * 2 * global_batch * global_batch * embed_dim


def train_flops_per_step(model_config: ml_collections.ConfigDict, global_batch: int) -> float:
    """FLOPs of one training step over the global batch: 3 × (towers + contrastive logits) forward."""
    forward = global_batch * clip_forward_flops_per_pair(model_config)
    forward += contrastive_logits_flops(global_batch, model_config.embed_dim)
    return TRAIN_FLOPS_PER_FORWARD * forward


def step_flops(lowered, config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one train step: XLA's cost analysis of the lowered step (`jax.jit(...).lower(...)`).

    The lowered program is the global, unpartitioned computation, so the figure does not depend on the mesh and
    excludes rematerialisation. Backends that cannot analyse a lowered program (GPU plugins in jax 0.10/0.11
    return None; their compiled analysis misses the work inside library calls) have it analysed by the CPU
    backend, which every jaxlib has. Falls back to the CLIP formula when neither gives a count.
    """
    for analyse in (lambda: lowered.cost_analysis(), lambda: _cpu_cost_analysis(lowered)):
        try:
            analysis = analyse()
        except (NotImplementedError, RuntimeError, ValueError, AttributeError, ImportError):
            analysis = None  # this backend or jax version cannot; try the next way
        if isinstance(analysis, (list, tuple)):  # older jax returned one dict per computation
            analysis = analysis[0] if analysis else None
        flops = (analysis or {}).get("flops")
        if flops and flops > 0:
            return float(flops)
    return train_flops_per_step(config.model, config.train.batch_size)


def _cpu_cost_analysis(lowered) -> dict[str, float]:
    """XLA's cost analysis of a lowered program by the CPU backend, whatever backend it was lowered for."""
    from jax._src import xla_bridge  # private: jax has no public route to another backend's analysis
    from jax._src.lib import _jax

    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), lowered.compiler_ir("hlo").as_hlo_module())


# Dense (no sparsity) peak FLOP/s per JAX device, matched by substring of the lower-cased
# `device.device_kind`; the first match wins, so more specific names come first. "float32" is the rate of
# JAX's default matmul precision for float32 inputs: TF32 tensor cores on Ampere and newer NVIDIA GPUs, one
# bfloat16 pass on TPU, true float32 on V100. A dtype missing from a row has no published figure.
_PEAK_FLOPS = (
    (("h100 pcie",), {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    (("h100", "h200"), {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    (("a100",), {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    (("v100",), {"float16": 125e12, "float32": 15.7e12}),
    (("tpu v4 lite",), {}),  # v4i, an inference chip: listed so it is not taken for a v4
    (("tpu v4",), {"bfloat16": 275e12, "float32": 275e12}),
    (("tpu v5 lite", "tpu v5e"), {"bfloat16": 197e12, "float32": 197e12}),
    (("tpu v5",), {"bfloat16": 459e12, "float32": 459e12}),  # v5p reports "TPU v5"
    (("tpu v6 lite", "tpu v6e"), {"bfloat16": 918e12, "float32": 918e12}),  # Trillium
)
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "tf32": "float32",
}


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device for matmuls in `dtype`; None for CPUs and unknown devices or dtypes."""
    kind = device_kind.lower()
    dtype = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    for names, peaks in _PEAK_FLOPS:
        if any(name in kind for name in names):
            return peaks.get(dtype)
    return None


def mfu(
    flops_per_step: float, step_seconds: float | None, device_kind: str, dtype: str, num_devices: int
) -> float | None:
    """Model FLOPs utilisation as a fraction of peak; None when the peak or the step time is unknown."""
    peak = peak_flops_per_device(device_kind, dtype)
    if peak is None or step_seconds is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * num_devices)
