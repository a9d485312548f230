"""BriVL and COTS methods: sharded = single-device, queue identical across meshes, the tokenizer stage, errors."""

import os
import signal
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import brivl, cots
from tests.helpers import small_towers
from vlp_jax import methods, parallel, preemption, stages, step, train
from vlp_jax.methods.cots import CotsMethod


def batch_of(config, seed=0):
    rng = np.random.default_rng(seed)
    size, length = config.model.image.image_size, config.model.text.max_len
    text = rng.integers(4, config.model.text.vocab_size, (16, length)).astype(np.int32)
    text[:, 0], text[:, 12], text[:, 13:] = 2, 3, 0  # BOS, words, EOS, padding
    return {"image": rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8), "text": text}


def run_steps(config, mesh, params, extra, steps, pretrained=None):
    """`steps` loss evaluations threading `extra` (params fixed); returns the per-step (loss, grads) and extra."""
    method = methods.build(config, mesh, pretrained)
    fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
    outputs = []
    with parallel.mesh_context(mesh):
        for step in range(steps):
            batch = parallel.global_batch_from_local(batch_of(config, step), mesh)
            (loss, (metrics, extra)), grads = fn(params, extra, batch, jax.random.PRNGKey(step), jnp.int32(step))
            outputs.append((loss, grads, metrics))
    return outputs, extra


def init(config, mesh, pretrained=None):
    method = methods.build(config, mesh, pretrained)
    params, extra = nn.meta.unbox(method.init(jax.random.PRNGKey(0), batch_of(config)))
    # Pretend the AMF has seen a few batches so its filter is active from the first step.
    extra["filter"] = {"mean": jnp.float32(0.05), "std": jnp.float32(0.05), "count": jnp.int32(5)}
    return params, extra


def mesh_of(shape):
    return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))),
                              devices=jax.devices()[: int(np.prod(shape))])


def assert_trees_close(got, want, rtol=2e-4, atol=1e-5):
    """Leaf by leaf; `atol` is relative to the leaf's largest magnitude (float32 sums differ in order)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


def test_brivl_sharded_loss_and_grads_equal_single_device():
    config = small_towers(brivl.get_config("tiny"))
    config.method.amf.enabled = True  # exercise the weights as COTS does
    params, extra = init(config, mesh_of((1, 1, 1)))
    (single,), _ = run_steps(config, mesh_of((1, 1, 1)), params, extra, 1)
    (sharded,), _ = run_steps(config, mesh_of((8, 1, 1)), params, extra, 1)
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    assert_trees_close(sharded[1], single[1])


def test_cots_loss_grads_and_queue_equal_across_meshes():
    config = small_towers(cots.get_config("tiny"), queue_size=32)
    config.method.mvm.tokenizer = "random"
    config.method.amf.warmup_steps = 0
    tokenizer = step.load_pretrained(config, mesh_of((1, 1, 1)))  # {"tokenizer": an untrained VQ run}
    params, extra = init(config, mesh_of((1, 1, 1)), tokenizer)
    single, single_extra = run_steps(config, mesh_of((1, 1, 1)), params, extra, 3, tokenizer)
    sharded, sharded_extra = run_steps(config, mesh_of((2, 2, 2)), params, extra, 3, tokenizer)
    for (loss, grads, metrics), (want_loss, want_grads, want_metrics) in zip(sharded, single, strict=True):
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        assert_trees_close(grads, want_grads)
        for term in ("instance_loss", "kl_loss", "mlm_loss", "mvm_loss", "amf/filtered_fraction"):
            np.testing.assert_allclose(metrics[term], want_metrics[term], rtol=1e-5, err_msg=term)
    assert 0 < float(single[0][2]["amf/filtered_fraction"]) < 1  # the filter really acted in this comparison
    # The same pairs in the same slots; keys equal up to float32 summation order (the towers run sharded).
    for key in ("valid", "pointer"):
        np.testing.assert_array_equal(sharded_extra["queue"][key], single_extra["queue"][key])
    assert_trees_close(sharded_extra["queue"], single_extra["queue"], rtol=1e-5, atol=2e-6)
    assert_trees_close(sharded_extra["ema"], single_extra["ema"], rtol=1e-5, atol=2e-6)
    assert int(single_extra["queue"]["pointer"]) == (3 * 16) % 32  # wrapped around once
    assert np.asarray(single_extra["queue"]["valid"]).sum() < 32  # filtered pairs were kept out


def test_cots_trains_its_tokenizer_stage_first_then_logs_every_term(trained_runs):
    config, tmp_path, final, records = trained_runs("cots")
    assert final["mean_r1"] >= 0
    assert (tmp_path / "tokenizer" / "checkpoints" / "2").is_dir()
    logged = records[-2] if "train/loss" not in records[-1] else records[-1]
    for term in ("instance_loss", "kl_loss", "mlm_loss", "mvm_loss", "amf/filtered_fraction", "loss"):
        assert np.isfinite(logged[f"train/{term}"]), term
    # A finished stage is reused, and the config then names it.
    again = stages.prepare(config, tmp_path, train_fn=None)
    assert again.method.mvm.tokenizer == str(tmp_path / "tokenizer")


def test_an_oversized_staged_run_is_refused_before_its_first_stage_trains(tmp_path, caplog):
    """The whole run is laid out in one line, and the final stage's memory verdict comes before the tokenizer
    stage trains: an oversized COTS run fails in seconds, not after its stage."""
    config = small_towers(cots.get_config("tiny"))
    config.data.train_size = 64
    config.train.device_memory_bytes = 1024
    with caplog.at_level("INFO"), pytest.raises(MemoryError, match="per device"):
        train.train_and_evaluate(config, str(tmp_path))
    messages = [record.getMessage() for record in caplog.records]
    run_line = next(message for message in messages if message.startswith("run: 2 stages: "))
    assert "1/2 visual tokenizer (vq, " in run_line and "2/2 cots (" in run_line
    assert any(message.startswith("plan: cots (tiny) with ") for message in messages)
    assert not any(message.startswith("stage 1/2: training") for message in messages)
    assert not (tmp_path / "tokenizer").exists()  # nothing trained, nothing written


def test_sigterm_during_the_tokenizer_stage_saves_it_and_stops_within_seconds(tmp_path):
    """A preemption while the COTS run trains its tokenizer stage saves the stage's step in flight and stops the
    whole run (Preempted: exit 75 from the command line); the stage's checkpoint is complete, nothing is staged."""
    config = small_towers(cots.get_config("tiny"))
    config.data.train_size = 64
    config.train.update(dict(steps=2000, log_every=1))
    config.method.mvm.update(dict(tokenizer_steps=1000, tokenizer_batch_size=16))
    sent = {}

    def send_once_the_stage_trains():
        deadline = time.monotonic() + 240
        metrics = tmp_path / "tokenizer" / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_once_the_stage_trains, daemon=True).start()
    with pytest.raises(preemption.Preempted, match="received SIGTERM: saved step") as stopped:
        train.train_and_evaluate(config, str(tmp_path))
    assert time.monotonic() - sent["at"] < 5
    assert 1 <= stopped.value.step < 1000
    saved = tmp_path / "tokenizer" / "checkpoints"
    assert [path.name for path in saved.iterdir()] == [str(stopped.value.step)]  # complete, nothing staged
    assert not (tmp_path / "checkpoints").exists()  # the COTS stage never started


def test_cots_refuses_a_tokenizer_with_another_patch_grid(tmp_path):
    config = small_towers(cots.get_config("tiny"))
    config.method.mvm.tokenizer = "random"
    pretrained = step.load_pretrained(config, mesh_of((1, 1, 1)))
    pretrained["tokenizer"].config.model.image.patch_size = 4
    with pytest.raises(ValueError, match="8px patches but this model uses 32px / 8px|4px patches"):
        CotsMethod(config, mesh_of((1, 1, 1)), pretrained)
    with pytest.raises(FileNotFoundError, match="no finished visual tokenizer"):
        stages.prepare(cots.get_config("tiny"), tmp_path, train_fn=None)


def test_paper_variant_queue_holds_whole_batches():
    config = brivl.get_config("paper")
    assert config.method.queue_size == 9_600 and config.method.queue_size % config.train.batch_size == 0
    assert config.method.temperature == 0.07 and config.method.momentum == 0.99
    config.train.batch_size = 1_000
    with pytest.raises(ValueError, match="queue_size=9600"):
        methods.build(config, mesh_of((8, 1, 1)))
