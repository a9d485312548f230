"""The capacity benchmark: the largest exact global batch within a device-memory budget (vlp_jax/capacity.py)."""

import pytest

from configs import clip
from tests.helpers import small_towers
from vlp_jax import capacity


def test_the_search_finds_the_largest_fitting_batch_to_within_an_eighth():
    config = clip.get_config("tiny")  # 8 fake devices: batches are multiples of 8 x micro_rows
    seen = []

    def measure(cfg, batch, microbatches):  # a step of 1 GiB fixed + 1 MiB per row of the live micro-batch
        seen.append((batch, microbatches, cfg.train.contrastive_chunk))
        return 2**30 + 2**20 * batch // microbatches

    budget = 2**30 + 2**20 * 3000  # 3,000 rows of a whole batch fit
    whole = capacity.largest_batch(config, "whole", budget, micro_rows=16, measure=measure)
    assert 3000 * 7 / 8 - 128 <= whole.largest <= 3000 and whole.largest % 128 == 0
    assert all(p.fits == (p.batch <= 3000) for p in whole.probes)
    assert {chunk for *_, chunk in seen} == {0} and {k for _, k, _ in seen} == {1}
    seen.clear()
    chunked = capacity.largest_batch(config, "micro+chunked", budget, micro_rows=16, chunk=64, max_batch=1 << 14,
                                     measure=measure)
    assert chunked.largest == 1 << 14  # one micro-batch of 128 rows is live whatever the batch: capped
    assert {chunk for *_, chunk in seen} == {64} and all(b // k == 128 for b, k, _ in seen)
    nothing = capacity.largest_batch(config, "whole", 2**30, micro_rows=16, measure=measure)
    assert nothing.largest == 0 and len(nothing.probes) == 1
    with pytest.raises(ValueError, match="--capacity_variants: unknown variant 'ring'"):
        capacity.largest_batch(config, "ring", budget, measure=measure)


def test_micro_batches_fit_a_larger_exact_batch_in_the_same_compiled_memory():
    """Real compiles on 8 fake devices: the budget is the whole-batch step's bytes at 256 pairs, so the whole
    search stops there, while micro-batches of 16 rows per replica fit four times the batch in it."""
    config = small_towers(clip.get_config("tiny"))
    budget = capacity.step_bytes(config, 256)
    whole = capacity.largest_batch(config, "whole", budget, micro_rows=16)
    assert whole.largest == 256 and whole.largest_bytes == budget
    micro = capacity.largest_batch(config, "micro", budget, micro_rows=16, max_batch=1024)
    assert micro.largest == 1024 and micro.probes[-1].microbatches == 8
    table = capacity.format_table([whole, micro], budget)
    assert "whole" in table and "1,024" in table and "K=8" in table
