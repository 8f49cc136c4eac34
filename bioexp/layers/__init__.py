"""Modules that hold weights: feedback-alignment layers, local-rule layers."""

from bioexp.layers.hebbian import HebbianLinear
from bioexp.layers.krotov import KrotovLayer
from bioexp.layers.local import LocalLayer

__all__ = ["HebbianLinear", "KrotovLayer", "LocalLayer"]
