"""FLOP formulas against hand counts and the published ViT-B/16 figure, peak table, MFU, writer, ETA."""

import json
import math
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from vlp_jax import flops, metrics


def tiny_model_config():
    return ml_collections.ConfigDict(
        dict(
            image=dict(image_size=8, patch_size=4, width=4, depth=1, heads=2, mlp_dim=8, pool="cls"),
            text=dict(vocab_size=10, max_len=3, width=2, depth=2, heads=1, mlp_dim=4),
            embed_dim=2,
        )
    )


def test_tiny_config_flops_match_hand_count():
    config = tiny_model_config()
    # Image: 4 patches + CLS = 5 tokens, d=4, m=8, one layer:
    # qkv 2·5·4·12=480, scores 2·25·4=200, values 200, out 2·5·4·4=160, mlp 2·5·4·8·2=640 → 1680;
    # patch embedding 2·4·48·4=1536; projection 2·4·2=16.
    assert flops.image_tower_flops(config.image, config.embed_dim) == 1680 + 1536 + 16
    # Text: 3 tokens, d=2, m=4, two layers of 72 + 36 + 36 + 24 + 96 = 264; projection 2·2·2=8.
    assert flops.text_tower_flops(config.text, config.embed_dim) == 2 * 264 + 8
    assert flops.clip_forward_flops_per_pair(config) == 3232 + 536
    # Batch 4: towers 4·3768=15072, logits 2·(4·4)·2 per direction × 2 directions = 128, then ×3 for training.
    assert flops.train_flops_per_step(config, global_batch=4) == 3 * (15072 + 128)


def test_no_cls_token_without_cls_pooling():
    config = tiny_model_config()
    config.image.pool = "gap"
    # 4 tokens instead of 5: qkv 384, scores 128, values 128, out 128, mlp 512 → 1280.
    assert flops.image_tower_flops(config.image, config.embed_dim) == 1280 + 1536 + 16


def test_vit_b16_matches_published_figure():
    image = ml_collections.ConfigDict(
        dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072, pool="cls")
    )
    # ViT-B/16 at 224px is quoted as 17.5 "GFLOPs" (DeiT, timm), which are multiply-accumulates: 2 FLOPs each.
    published_flops = 2 * 17.5e9
    assert flops.image_tower_flops(image, embed_dim=512) == pytest.approx(published_flops, rel=0.1)


@pytest.mark.parametrize(
    ("device_kind", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 494e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
        ("Tesla V100-SXM2-16GB", "float16", 125e12),
        ("Tesla V100-SXM2-16GB", "bfloat16", None),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v4 lite", "bfloat16", None),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5e", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("TPU v6 lite", "float16", None),
        ("cpu", "float32", None),
        ("Some Future Accelerator", "bfloat16", None),
    ],
)
def test_peak_flops_lookup(device_kind, dtype, expected):
    assert flops.peak_flops_per_device(device_kind, dtype) == expected


def test_mfu_arithmetic():
    # 1 PFLOP per step in 0.5 s on 4 H100s in bfloat16: 2e15 FLOP/s of 4·989e12 available.
    got = flops.mfu(1e15, 0.5, "NVIDIA H100 80GB HBM3", "bfloat16", num_devices=4)
    assert got == pytest.approx(2e15 / (4 * 989e12))
    assert flops.mfu(1e15, 0.5, "cpu", "float32", num_devices=1) is None
    assert flops.mfu(1e15, None, "TPU v4", "bfloat16", num_devices=1) is None


def read_scalar_events(directory):
    """{(tag, step): value} from the TFRecord event files under `directory`."""
    scalars = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]  # after the length and its CRC
            offset += 12 + length + 4  # then the payload's CRC
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "run")
    writer.write(10, {"train/loss": 2.5, "train/steps": 7, "eta": "3m12s", "lr": np.float32(0.25)})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()  # flushed before close
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "train/loss": 2.5, "train/steps": 7, "eta": "3m12s", "lr": 0.25}
    ]
    writer.write(20, {"train/loss": math.nan, "grad_norm": math.inf, "mfu": None, "tau": jnp.asarray(0.5)})
    writer.close()

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert json.loads(lines[1]) == {
        "step": 20, "train/loss": None, "grad_norm": None, "mfu": None, "tau": 0.5
    }
    assert read_scalar_events(tmp_path / "run" / "tensorboard") == {
        ("train/loss", 10): 2.5,
        ("train/steps", 10): 7.0,
        ("lr", 10): 0.25,
        ("tau", 20): 0.5,
    }


def test_writer_appends_and_can_skip_tensorboard(tmp_path):
    for step in (1, 2):
        writer = metrics.MetricWriter(tmp_path, use_tensorboard=False)
        writer.write(step, {"loss": 1.0})
        writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_writer_rejects_step_key_and_non_scalars(tmp_path):
    writer = metrics.MetricWriter(tmp_path, use_tensorboard=False)
    with pytest.raises(ValueError, match="must not contain the key 'step'"):
        writer.write(1, {"step": 3})
    with pytest.raises(ValueError, match=r"metric 'loss' must be a scalar, got shape \(2,\)"):
        writer.write(1, {"loss": np.ones(2)})
    writer.close()


def test_format_console():
    line = metrics.format_console(
        120, 600, {"train/loss": 2.31234, "lr": 1.5e-5, "pairs/s": 12345.6, "mfu": None, "eta": "3m12s"}
    )
    assert line == "step 120/600 | train/loss 2.312 | lr 1.5e-05 | pairs/s 1.235e+04 | mfu n/a | eta 3m12s"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"), (45, "45s"), (59.6, "1m00s"), (192, "3m12s"),
        (3720, "1h02m"), (90_000, "25h00m"), (-3, "0s"),
    ],
)
def test_format_duration(seconds, expected):
    assert metrics.format_duration(seconds) == expected


def test_throughput_window_rates_and_eta():
    throughput = metrics.Throughput(total_steps=600, global_batch=256)
    throughput.mark(0, 10.0)
    assert throughput.steps_per_sec is None and throughput.pairs_per_sec is None and throughput.eta() == "n/a"
    throughput.mark(100, 60.0)  # 100 steps in 50 s
    assert throughput.step_seconds == 0.5
    assert throughput.steps_per_sec == 2.0 and throughput.pairs_per_sec == 512.0
    assert throughput.eta() == "4m10s"  # 500 steps left at 0.5 s
    throughput.mark(120, 64.0)  # only the window since the last mark counts: 20 steps in 4 s
    assert throughput.step_seconds == pytest.approx(0.2)
    assert throughput.eta() == "1m36s"


def lowered_tiny_step(name: str):
    """The tiny config of a method and its train step lowered (not compiled) for a random global batch."""
    import importlib

    from vlp_jax import parallel, step  # not vlp_jax.bench: its flags clash with vlp_jax.main's in one process

    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    batch, size = config.train.batch_size, config.model.image.image_size
    host_batch = {
        "image": np.zeros((batch, size, size, 3), np.uint8),
        "text": np.full((batch, config.model.text.max_len), 3, np.int32),
    }
    run = step.setup(config)
    with parallel.mesh_context(run.mesh):
        return config, run.train_step.lower(run.state, parallel.global_batch_from_local(host_batch, run.mesh))


def test_step_flops_counts_each_methods_own_program():
    clip_config, clip_step = lowered_tiny_step("clip")
    formula = flops.train_flops_per_step(clip_config.model, clip_config.train.batch_size)
    # XLA's count of CLIP's step agrees with the closed-form matmul count (it adds norms, softmax, the optimizer).
    assert flops.step_flops(clip_step, clip_config) == pytest.approx(formula, rel=0.03)
    # BriVL adds a momentum forward pass of both towers and its pooling heads: more than 4/3 of CLIP's count.
    brivl_config, brivl_step = lowered_tiny_step("brivl")
    assert flops.step_flops(brivl_step, brivl_config) > 4 / 3 * formula


def test_step_flops_of_a_backend_without_lowered_analysis_come_from_the_cpu_backend():
    config, step = lowered_tiny_step("clip")

    class GpuLike:  # GPU plugins return None for a lowered program's cost analysis
        def cost_analysis(self):
            return None

        def compiler_ir(self, dialect):
            return step.compiler_ir(dialect)

    assert flops.step_flops(GpuLike(), config) == flops.step_flops(step, config)


def test_step_flops_falls_back_to_the_formula():
    class NoAnalysis:
        def cost_analysis(self):
            raise NotImplementedError

        def compiler_ir(self, dialect):
            raise NotImplementedError

    config = ml_collections.ConfigDict(dict(model=tiny_model_config(), train=dict(batch_size=4)))
    assert flops.step_flops(NoAnalysis(), config) == flops.train_flops_per_step(config.model, 4)
