"""Registered models. Importing this package registers every built-in model."""

from bioexp.models import (  # noqa: F401
    baselines,
    feedback,
    forward_forward,
    hebbian,
    krotov,
    softhebb,
)
from bioexp.models.base import Classifier

__all__ = ["Classifier"]
