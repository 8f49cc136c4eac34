"""Modules that hold weights: local-rule layers and, in later families, feedback matrices."""

from bioexp.layers.local import LocalLayer

__all__ = ["LocalLayer"]
