"""Training metrics: FLOP counting and MFU, throughput and ETA, and the JSONL + TensorBoard writer.

A matmul [m, k] × [k, n] costs 2·m·k·n FLOPs (a multiply-accumulate is two FLOPs; papers quoting ViT-B/16 at
"17.5 GFLOPs" count multiply-accumulates). The FLOPs behind MFU are those of the train step's own program
(`step_flops`: XLA's count of the lowered, not yet partitioned or rematerialised step over the global batch), so
every method is charged for what it computes: BriVL's and COTS's momentum encoders, COTS's masked passes. The
closed-form CLIP count (`train_flops_per_step`: towers and logits, matmuls only) is the fallback and the check.
"""

import json
import math
import os
import pathlib
from collections.abc import Mapping

import ml_collections
import numpy as np
import tensorboardX

# A training step costs the forward pass plus a backward pass of about twice the forward.
TRAIN_FLOPS_PER_FORWARD = 3
IMAGE_CHANNELS = 3  # RGB pixels per patch position

Scalar = float | int | str | None


# FLOPs and MFU


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


# Throughput and ETA


def format_duration(seconds: float) -> str:
    """Compact duration: "1h02m" from an hour up, "3m12s" from a minute up, else "45s"."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Throughput:
    """Steps/s, pairs/s and ETA over the window between the last two `mark(step, time.perf_counter())` calls.

    Mark once before the loop (after compilation, so the first window does not include it), then at each log
    step after the step's results are on the host, so asynchronous dispatch does not hide device time.
    """

    def __init__(self, total_steps: int, global_batch: int):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self._last_step: int | None = None
        self._last_time: float | None = None
        self._step_seconds: float | None = None

    def mark(self, step: int, now: float) -> None:
        """Records that `step` steps were done at `now` (seconds), closing the window since the last mark."""
        if self._last_step is not None and step > self._last_step and now > self._last_time:
            self._step_seconds = (now - self._last_time) / (step - self._last_step)
        self._last_step, self._last_time = step, now

    @property
    def step_seconds(self) -> float | None:
        """Mean seconds per step over the last window; None before two marks."""
        return self._step_seconds

    @property
    def steps_per_sec(self) -> float | None:
        return None if self._step_seconds is None else 1.0 / self._step_seconds

    @property
    def pairs_per_sec(self) -> float | None:
        return None if self._step_seconds is None else self.global_batch / self._step_seconds

    def eta(self) -> str:
        """Time left for the remaining steps at the last window's rate; "n/a" before two marks."""
        if self._step_seconds is None:
            return "n/a"
        return format_duration(max(0, self.total_steps - self._last_step) * self._step_seconds)


# Writing


def _plain(key: str, value: object) -> Scalar:
    """A Python None, str, int or float from a scalar of any kind (Python, NumPy, 0-d NumPy or JAX array)."""
    if value is None or isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.shape != ():
        raise ValueError(f"metric {key!r} must be a scalar, got shape {array.shape}")
    return int(array) if np.issubdtype(array.dtype, np.integer) else float(array)


class MetricWriter:
    """Appends scalars to `<workdir>/metrics.jsonl` (one JSON object per line) and to TensorBoard.

    In a multi-process run only process 0 writes: the others pass `enabled=False` and write nothing. Appending
    means a run resumed from a checkpoint writes the steps after that checkpoint again; readers keep the last line
    per step.
    """

    def __init__(self, workdir: str | pathlib.Path, *, use_tensorboard: bool = True, enabled: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        jsonl = self.workdir / "metrics.jsonl" if enabled else os.devnull
        self._jsonl = open(jsonl, "a", encoding="utf-8")  # closed by close()
        self._use_tensorboard = use_tensorboard and enabled
        self._tensorboard: tensorboardX.SummaryWriter | None = None

    def write(self, step: int, scalars: Mapping[str, object]) -> None:
        """Writes one record. Non-finite floats become JSON null and are left out of TensorBoard."""
        if "step" in scalars:
            raise ValueError("scalars must not contain the key 'step'; it is the `step` argument")
        values = {key: _plain(key, value) for key, value in scalars.items()}
        record = {"step": int(step)}
        record |= {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self._use_tensorboard and numeric:
            writer = self._tensorboard_writer()
            for key, value in numeric.items():
                writer.add_scalar(key, value, global_step=int(step))
            writer.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Adds a uint8 [H, W, 3] image to TensorBoard (images are not written to the JSONL file)."""
        if not self._use_tensorboard:
            return
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != IMAGE_CHANNELS:
            raise ValueError(f"image {tag!r} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        writer = self._tensorboard_writer()
        writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
        writer.flush()

    def _tensorboard_writer(self) -> tensorboardX.SummaryWriter:
        """The TensorBoard writer, created on first use so runs that write nothing leave no event file."""
        if self._tensorboard is None:
            self._tensorboard = tensorboardX.SummaryWriter(logdir=str(self.workdir / "tensorboard"))
        return self._tensorboard

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def format_console(step: int, total_steps: int, scalars: Mapping[str, object]) -> str:
    """One line: "step 120/600 | train/loss 2.31 | ... | eta 3m12s"; floats to 4 significant digits."""
    parts = [f"step {step}/{total_steps}"]
    for key, value in scalars.items():
        value = _plain(key, value)
        if value is None:
            text = "n/a"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)
