"""``train.lr_schedule`` with ``train.lr_hold``: the peak held for a fraction of the post-warm-up steps before the
decay, as VAR's ``lin0`` schedule does; without a hold the schedules are the plain warm-up + decay."""

from __future__ import annotations

import math

import pytest

from xqgan_core import Registry
from xqgan_core.errors import ConfigError
from xqgan_core.optim import warmup_schedule


def _var_lin0(step: int, warmup: int, total: int, end: float, hold: float = 0.05) -> float:
    """VAR's utils/lr_control.py ``lin0`` after the warm-up, re-derived: peak for the first 5 % of the rest, then
    linear to ``end`` (its wpe) at the last step (VAR divides by one step fewer: max_it - 1 - wp_it)."""
    passed = (step - warmup) / (total - warmup)
    return 1.0 if passed < hold else end + (1 - end) * (1 - passed) / (1 - hold)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_no_hold_is_warm_up_then_decay(kind: str) -> None:
    f = warmup_schedule(kind, 10, 110, 0.1)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(110) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * (0.5 if kind == "cosine" else 0.5)  # halfway: cos and linear both at the midpoint
    assert f(60) == pytest.approx(mid)
    assert f(35) > f(60) > f(85)


def test_linear_hold_is_vars_lin0() -> None:
    warmup, total, end = 100, 10_100, 0.01
    f = warmup_schedule("linear", warmup, total, end, hold=0.05)
    for step in (100, 400, 599, 600, 601, 2000, 6000, 10_099):
        assert f(step) == pytest.approx(_var_lin0(step, warmup, total, end), abs=1e-12), step
    assert f(599) == 1.0 and f(700) < 1.0


def test_cosine_hold_starts_its_half_cycle_after_the_hold() -> None:
    f = warmup_schedule("cosine", 0, 100, 0.0, hold=0.2)
    assert f(0) == f(19) == 1.0
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.0)


def test_lr_hold_is_validated() -> None:
    with pytest.raises(ConfigError, match="train.lr_hold"):
        Registry.from_dict({"data": {"use": "sample"}, "encoder": {"use": "cnn"}, "quantizer": {"use": "vq"},
                            "decoder": {"use": "cnn"}, "train": {"lr_hold": 1.0}})  # fmt: skip
