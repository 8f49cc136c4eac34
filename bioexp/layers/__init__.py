"""Modules that hold weights: feedback-alignment layers, local-rule layers."""

from bioexp.layers.hebbian import HebbianLinear
from bioexp.layers.krotov import KrotovLayer
from bioexp.layers.local import LocalLayer
from bioexp.layers.softhebb import SoftHebbConv2d, SoftHebbLinear

__all__ = ["HebbianLinear", "KrotovLayer", "LocalLayer", "SoftHebbConv2d", "SoftHebbLinear"]
