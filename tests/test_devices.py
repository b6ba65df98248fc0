"""Built-in devices: precision choices and CUDA switches, checked without a GPU (CUDADevice builds without one)."""

from __future__ import annotations

import pytest
import torch

from xqgan_core import build
from xqgan_core.devices import CPUDevice, CUDADevice, auto_device


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("tf32", [True, False])
def test_cuda_tf32_switch_follows_the_run_file(tf32, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    device = build("device", {"use": "cuda", "tf32": tf32})
    assert isinstance(device, CUDADevice)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


def test_cuda_auto_precision_is_bf16_where_supported(monkeypatch, restore_tf32):
    device = CUDADevice(CUDADevice.Config())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.autocast_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.autocast_dtype("auto") is torch.float16
    assert device.autocast_dtype("fp32") is None and device.dist_backend == "nccl"


def test_cpu_auto_precision_stays_fp32():
    device = CPUDevice(CPUDevice.Config())
    assert device.autocast_dtype("auto") is None
    assert device.autocast_dtype("bf16") is torch.bfloat16


def test_auto_device_falls_back_to_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(__import__("sys").modules, "habana_frameworks", None)  # no HPU stack either
    assert isinstance(auto_device(), CPUDevice)
