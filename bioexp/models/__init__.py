"""Registered models. Importing this package registers every built-in model."""

from bioexp.models import baselines, feedback, forward_forward, hebbian, krotov  # noqa: F401
from bioexp.models.base import Classifier

__all__ = ["Classifier"]
