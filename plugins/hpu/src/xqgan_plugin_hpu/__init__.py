"""Habana Gaudi (HPU) device plugin for xqgan. Imports without the Gaudi software installed."""

from .device import HPUDevice

__all__ = ["HPUDevice"]
