"""Config variants compiled and timed side by side (vlp_jax/variants.py, `python -m vlp_jax.bench variants`)."""

import os

import pytest

from configs import clip
from vlp_jax import variants


def test_a_variant_converts_each_value_to_its_keys_type():
    config = clip.get_config("tiny")
    text = "model.scan_layers=true, model.remat=full,train.batch_size=64,train.learning_rate=3e-4,env:VLP_X=a,b"
    variant = variants.parse_variant(config, text)
    assert variant.config == {"model.scan_layers": True, "model.remat": "full", "train.batch_size": 64,
                              "train.learning_rate": 3e-4}
    assert type(variant.config["train.learning_rate"]) is float and type(variant.config["train.batch_size"]) is int
    assert variant.env == {"VLP_X": "a,b"}  # a comma splits only where a key= follows it
    assert variant.name == text
    as_given = variants.parse_variant(config, "")
    assert (as_given.name, as_given.config, as_given.env) == ("(config as given)", {}, {})
    assert variants.parse_variant(config, "model.scan_layers=0").config == {"model.scan_layers": False}


@pytest.mark.parametrize("text, message", [
    ("model.scan_layer=true", "--variant='model.scan_layer=true': model.scan_layer: config.model has no key "
                              "'scan_layer'. Its keys: .*scan_layers"),
    ("model.scan_layers=maybe", "model.scan_layers='maybe' is not a boolean; use true or false"),
    ("train.batch_size=1.5", "train.batch_size='1.5' is not an integer"),
    ("train.learning_rate=fast", "train.learning_rate='fast' is not a number"),
    ("model=small", "model is a group of keys, not a value; override one of: .*embed_dim"),
    ("model.scan_layers", "'model.scan_layers' is not key=value"),
])
def test_a_bad_variant_is_refused_naming_the_key_and_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        variants.parse_variant(clip.get_config("tiny"), text)


class FakeStep:
    """Stands in for a compiled step: records the config and environment it was built under; each step of the
    variant whose batch is 64 takes twice as long as the others."""

    built = []

    def __init__(self, config):
        self.config, self.env, self.steps, self.compile_seconds = config, os.environ.get("VLP_TEST_ENV"), 0, 1.0
        FakeStep.built.append(self)

    @classmethod
    def build(cls, config, warmup):
        return cls(config)

    def timed_step(self):
        self.steps += 1
        return 0.2 if self.config.train.batch_size == 64 else 0.1

    def figures(self, step_seconds):
        return {"compile_s": self.compile_seconds, "step_s_median": step_seconds, "mfu": None,
                "pairs_per_s": self.config.train.batch_size / step_seconds, "estimated_bytes_per_device": 2**30}


def test_each_variant_is_built_under_its_overrides_and_environment_and_timed_against_the_first(monkeypatch):
    monkeypatch.setattr(variants, "CompiledStep", FakeStep)
    monkeypatch.delenv("VLP_TEST_ENV", raising=False)
    FakeStep.built.clear()
    config = clip.get_config("tiny")
    chosen = [variants.parse_variant(config, text) for text in
              ("", "train.batch_size=64,env:VLP_TEST_ENV=on", "model.scan_layers=true")]
    results = variants.benchmark(config, chosen, steps=5, warmup=1)
    first, slower, scanned = FakeStep.built
    assert (first.env, slower.env, scanned.env) == (None, "on", None) and "VLP_TEST_ENV" not in os.environ
    assert (first.config.train.batch_size, slower.config.train.batch_size) == (config.train.batch_size, 64)
    assert scanned.config.model.scan_layers and not first.config.model.scan_layers and not config.model.scan_layers
    assert [one.steps for one in FakeStep.built] == [5, 5, 5]
    assert [row["ratio"] for row in results] == [1.0, 2.0, 1.0]
    assert [row["variant"] for row in results] == ["(config as given)", "train.batch_size=64,env:VLP_TEST_ENV=on",
                                                    "model.scan_layers=true"]
    table = variants.format_table(results)
    assert "2.000x [2.000, 2.000]" in table.splitlines()[2] and "n/a" in table
