"""Progress lines of long phases: counts, percentage and ETA with a known total, the final count without one."""

import logging

from vlp_jax import progress


def test_progress_lines_give_counts_and_an_eta(caplog):
    with caplog.at_level(logging.INFO):
        assert list(progress.logged(range(4), "scenes written", total=4, every_s=0.0)) == [0, 1, 2, 3]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4 and lines[1].startswith("scenes written: 2/4 (50%), ") and "ETA" in lines[1]
    assert lines[-1].startswith("scenes written: 4/4 (100%)")


def test_without_a_total_the_final_count_is_logged_once(caplog):
    with caplog.at_level(logging.INFO):
        assert list(progress.logged(iter("abc"), "captions read", every_s=3600.0)) == ["a", "b", "c"]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("captions read: 3, ")
