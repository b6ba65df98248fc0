"""Lifecycle hooks: registration, chaining of step wrappers, checkpoint state, spec checking."""

from __future__ import annotations

import pluggy
import pytest

from xqgan_core import build
from xqgan_core.hooks import chain_step_wrappers, hookimpl, make_plugin_manager


class Recorder:
    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    @hookimpl
    def xqgan_wrap_train_step(self, step_fn):
        def wrapped(x):
            self.log.append(f"{self.tag}>")
            out = step_fn(x)
            self.log.append(f"<{self.tag}")
            return out

        return wrapped


def test_step_wrappers_chain_in_registration_order():
    log: list[str] = []
    pm = make_plugin_manager([("a", Recorder("a", log)), ("b", Recorder("b", log))])
    step = chain_step_wrappers(pm, lambda x: log.append("step") or x * 2)
    assert step(3) == 6
    assert log == ["b>", "a>", "step", "<a", "<b"]


def test_misspelt_hook_is_refused():
    class Typo:
        @hookimpl
        def xqgan_step_ned(self, step, metrics):
            pass

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager([("typo", Typo())])


def test_step_timer_is_a_hook_component_and_keeps_state():
    timer = build("hooks", {"use": "step-timer", "report_every": 2})
    pm = make_plugin_manager([("step-timer", timer)])
    step = chain_step_wrappers(pm, lambda: sum(range(10000)))
    metrics: dict[str, float] = {}
    for i in (1, 2):
        step()
        pm.hook.xqgan_step_end(step=i, metrics=metrics)
    assert metrics["time/step_s"] > 0 and metrics["time/total_train_s"] >= metrics["time/step_s"]
    [state] = pm.hook.xqgan_checkpoint_state()
    fresh = build("hooks", {"use": "step-timer"})
    make_plugin_manager([("step-timer", fresh)]).hook.xqgan_load_checkpoint_state(state=state)
    assert fresh.total_s == pytest.approx(timer.total_s)
    [header] = pm.hook.xqgan_report_header(registry=None)
    assert "step-timer" in header
