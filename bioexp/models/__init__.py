"""Registered models. Importing this package registers every built-in model."""

from bioexp.models import (  # noqa: F401
    baselines,
    equilibrium,
    feedback,
    forward_forward,
    hebbian,
    krotov,
    predictive_coding,
    softhebb,
)
from bioexp.models.base import Classifier

__all__ = ["Classifier"]
