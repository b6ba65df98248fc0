"""Habana Gaudi (HPU) device for xqgan.

This module imports on any machine: ``habana_frameworks`` (Intel Gaudi software) is imported only inside methods,
and only once the device is actually used, so a CPU/CUDA install can list, describe and validate ``hpu``.

How the engine drives it:

* ``is_available()`` -- Gaudi software importable and ``torch.hpu.is_available()``; never raises.
* ``torch_device`` -- ``torch.device("hpu")``. Under ``torchrun``/``mpirun`` the Gaudi bridge maps each process to
  its own card from the launcher's environment, so no index is needed.
* ``dist_backend`` -- ``"hccl"``. The HCCL backend only exists in torch.distributed after
  ``import habana_frameworks.torch.distributed.hccl``; reading ``dist_backend`` (what the engine does right before
  ``init_process_group``) performs that import through ``init_distributed()``.
* ``autocast_dtype("auto")`` -- bf16 (Gaudi's native reduced precision); ``autocast`` uses
  ``torch.autocast(device_type="hpu", ...)``.
* ``step_end()`` -- in lazy mode, ``habana_frameworks.torch.core.mark_step()``: lazy mode only queues ops and
  this call compiles and launches the accumulated graph. One call per optimizer step is what correctness needs.
* ``wrap_for_eval(module)`` -- with ``graphs = true``, wraps a module in HPU graphs
  (``habana_frameworks.torch.hpu.wrap_in_hpu_graph``) so repeated eval forwards replay a captured graph.

Whether the process runs in lazy or eager mode is decided by the ``PT_HPU_LAZY_MODE`` environment variable, which
the Gaudi bridge reads when it is first imported; ``lazy_mode`` must agree with it (a mismatch is warned about).
"""

from __future__ import annotations

import importlib
import os
import warnings
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from xqgan_core.config import config, option
from xqgan_core.interfaces import Device

LAZY_ENV = "PT_HPU_LAZY_MODE"


def _torch_hpu_attr(name: str) -> Any:
    """``torch.hpu.<name>`` if the Gaudi bridge registered it, else None (guards every access)."""
    return getattr(getattr(torch, "hpu", None), name, None)


class HPUDevice(Device):
    """Habana Gaudi accelerator: bf16 autocast, HCCL for DDP, ``mark_step`` after each step in lazy mode."""

    plugin_api = 1
    name = "hpu"

    @config
    class Config:
        lazy_mode: bool = option(
            True,
            help="The process runs in Gaudi lazy mode (PT_HPU_LAZY_MODE=1): call mark_step() after every optimizer "
            "step. Set false for eager mode (PT_HPU_LAZY_MODE=0), where no mark_step is issued.",
        )
        graphs: bool = option(
            False,
            help="Wrap modules run for evaluation in HPU graphs (capture once, replay) to cut host overhead; "
            "needs lazy_mode and fixed input shapes.",
        )

        def check(self) -> list[str]:
            if self.graphs and not self.lazy_mode:
                return ["graphs: HPU graphs are only supported in lazy mode; set lazy_mode = true or graphs = false"]
            return []

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._mark_step: Any = None
        env = os.environ.get(LAZY_ENV)
        if env in ("0", "1") and (env == "1") != config.lazy_mode:
            warnings.warn(
                f"hpu device: lazy_mode = {str(config.lazy_mode).lower()} but {LAZY_ENV}={env}; the environment "
                "variable decides how the Gaudi bridge executes, so step_end() may issue unneeded or miss needed "
                "mark_step() calls",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- availability --------------------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        try:
            importlib.import_module("habana_frameworks.torch")  # registers torch.hpu
            check = _torch_hpu_attr("is_available")
            return bool(check()) if callable(check) else False
        except Exception:  # noqa: BLE001 - a missing or broken Gaudi install means "not available", never a crash
            return False

    # -- placement and distribution ------------------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        return torch.device("hpu")

    @property
    def dist_backend(self) -> str:
        self.init_distributed()
        return "hccl"

    def init_distributed(self) -> None:
        """Register the HCCL backend with torch.distributed (idempotent; needed before ``init_process_group``)."""
        importlib.import_module("habana_frameworks.torch.distributed.hccl")

    # -- precision -----------------------------------------------------------------------------------------
    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "auto":
            return torch.bfloat16
        return super().autocast_dtype(precision)

    def autocast(self, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
        if dtype is None:
            return super().autocast(None)
        return torch.autocast(device_type="hpu", dtype=dtype)

    # -- stepping ------------------------------------------------------------------------------------------
    def step_end(self) -> None:
        if not self.config.lazy_mode:
            return
        if self._mark_step is None:
            self._mark_step = importlib.import_module("habana_frameworks.torch.core").mark_step
        self._mark_step()

    def wrap_for_eval(self, module: nn.Module) -> nn.Module:
        """The module to use for evaluation forwards: HPU-graph wrapped when ``graphs`` is on, else unchanged.

        Only for modules whose eval forward has static shapes and no data-dependent control flow; the wrapped
        module must not be trained afterwards.
        """
        if not self.config.graphs:
            return module
        hpu = importlib.import_module("habana_frameworks.torch.hpu")
        return hpu.wrap_in_hpu_graph(module)

    def synchronize(self) -> None:
        sync = _torch_hpu_attr("synchronize")
        if callable(sync):
            sync()

    # -- memory --------------------------------------------------------------------------------------------
    def peak_memory_bytes(self) -> int | None:
        peak = _torch_hpu_attr("max_memory_allocated")
        return int(peak()) if callable(peak) else None

    def reset_peak_memory(self) -> None:
        reset = _torch_hpu_attr("reset_peak_memory_stats")
        if callable(reset):
            reset()


__all__ = ["HPUDevice"]
