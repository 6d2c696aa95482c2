"""Quantization algorithms as modifiers on the calibration lifecycle (see :mod:`.base`); the
sequential pipeline (:mod:`ferroquant.pipeline`) drives them block by block."""

from .base import LifecycleError, Modifier, Target
from .gptq import GPTQModifier, UnreachedLayerError
from .quantization import QuantizationModifier, WeightModifier

__all__ = [
    "GPTQModifier",
    "LifecycleError",
    "Modifier",
    "QuantizationModifier",
    "Target",
    "UnreachedLayerError",
    "WeightModifier",
]
