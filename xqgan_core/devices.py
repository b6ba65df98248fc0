"""Built-in devices: CPU and CUDA. (Habana HPU ships as the ``xqgan-plugin-hpu`` distribution.)"""

from __future__ import annotations

import torch

from .catalog import catalog
from .config import config, option
from .interfaces import Device


class CPUDevice(Device):
    plugin_api = 1
    name = "cpu"

    @config
    class Config:
        pass

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        # bf16 autocast on CPU is slower than fp32 for convs on most CPUs; "auto" keeps fp32 here.
        return None if precision == "auto" else super().autocast_dtype(precision)


class CUDADevice(Device):
    plugin_api = 1
    name = "cuda"

    @config
    class Config:
        tf32: bool = option(
            True,
            help="let fp32 matrix products and convolutions use TF32 tensor cores (about 3x faster on Ampere and "
            "newer; 10-bit mantissa in the products, fp32 accumulation). Set false for bit-exact fp32.",
        )

    def __init__(self, config: CUDADevice.Config) -> None:
        super().__init__(config)
        # process-wide switches: they matter for precision = "fp32" and for the ops autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @property
    def torch_device(self) -> torch.device:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda")

    @property
    def dist_backend(self) -> str:
        return "nccl"

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return super().autocast_dtype(precision)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def peak_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated())

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()


#: Preference order when the run file selects no device.
AUTO_ORDER = ("hpu", "cuda", "cpu")


def device_named(name: str | None) -> Device:
    """The device a command line's ``--device`` names (cpu, cuda, hpu, or an installed device plugin); None or
    "auto": ``auto_device()``."""
    from .registry import build

    return auto_device() if name in (None, "auto") else build("device", str(name))


def auto_device() -> Device:
    """The best available installed device: HPU, then CUDA, then CPU."""
    cat = catalog()
    for name in AUTO_ORDER:
        for entry in cat.of_kind("device"):
            if entry.name != name:
                continue
            try:
                cls = entry.load()
            except Exception:  # noqa: BLE001 - a broken optional backend must not stop a CPU run
                continue
            if cls.is_available():
                return cls(cls.Config())
    return CPUDevice(CPUDevice.Config())
