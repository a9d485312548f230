"""Training metrics: throughput and ETA, the console line, and the JSONL + TensorBoard writer (FLOPs: flops.py)."""

import json
import math
import os
import pathlib
from collections.abc import Mapping

import numpy as np
import tensorboardX

from vlp_jax import flops

Scalar = float | int | str | None


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
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != flops.IMAGE_CHANNELS:
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
