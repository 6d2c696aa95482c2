"""ferroquant: GPTQ post-training quantization for Hugging Face causal LMs, with a Rust core.

The public surface is small::

    import ferroquant as fq
    calib = fq.calibration.from_file("calib.jsonl", tokenizer, num_samples=128, seq_len=512)
    report = fq.quantize(model, "W4A16", calib)   # recipe: preset, dict, YAML path or fq.GPTQ
    fq.save(model, "out", format="gptq")          # or "compressed-tensors"
    qmodel = fq.load("out")                       # QuantLinear modules, generate() works
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import calibration
    from .api import quantize
    from .blocks import BlockDiscoveryError
    from .calls import NonFiniteActivationError
    from .config import GPTQ, PRESET_SCHEMES, QuantizationArgs, QuantizationScheme
    from .formats import CheckpointError, convert, load, save
    from .modifiers import GPTQModifier, QuantizationModifier, UnreachedLayerError
    from .nn import Float8Linear, QuantLinear
    from .report import LayerReport, QuantizationReport

# Imported on first use, so that `import ferroquant.cli` (and `ferroquant inspect`) does not pay
# for torch and transformers before a command needs them.
_LAZY = {
    "calibration": (".calibration", None),
    "quantize": (".api", "quantize"),
    "BlockDiscoveryError": (".blocks", "BlockDiscoveryError"),
    "GPTQ": (".config", "GPTQ"),
    "PRESET_SCHEMES": (".config", "PRESET_SCHEMES"),
    "QuantizationArgs": (".config", "QuantizationArgs"),
    "QuantizationScheme": (".config", "QuantizationScheme"),
    "CheckpointError": (".formats", "CheckpointError"),
    "convert": (".formats", "convert"),
    "load": (".formats", "load"),
    "save": (".formats", "save"),
    "Float8Linear": (".nn", "Float8Linear"),
    "QuantLinear": (".nn", "QuantLinear"),
    "LayerReport": (".report", "LayerReport"),
    "NonFiniteActivationError": (".calls", "NonFiniteActivationError"),
    "QuantizationReport": (".report", "QuantizationReport"),
    "GPTQModifier": (".modifiers", "GPTQModifier"),
    "QuantizationModifier": (".modifiers", "QuantizationModifier"),
    "UnreachedLayerError": (".modifiers", "UnreachedLayerError"),
}


def __getattr__(name: str) -> Any:
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'ferroquant' has no attribute {name!r}")
    mod = importlib.import_module(spec[0], __name__)
    value = mod if spec[1] is None else getattr(mod, spec[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "GPTQ",
    "PRESET_SCHEMES",
    "BlockDiscoveryError",
    "CheckpointError",
    "Float8Linear",
    "GPTQModifier",
    "LayerReport",
    "NonFiniteActivationError",
    "QuantLinear",
    "QuantizationArgs",
    "QuantizationModifier",
    "QuantizationReport",
    "QuantizationScheme",
    "UnreachedLayerError",
    "__version__",
    "calibration",
    "convert",
    "load",
    "quantize",
    "save",
]
