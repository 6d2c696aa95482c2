"""ferroquant: GPTQ post-training quantization for Hugging Face causal LMs, with a Rust core.

The public surface is small::

    import ferroquant as fq
    calib = fq.calibration.from_file("calib.jsonl", tokenizer, num_samples=128, seq_len=512)
    report = fq.quantize(model, "W4A16", calib)   # recipe: preset, dict, YAML path or fq.GPTQ
    fq.save(model, "out", format="gptq")          # or "compressed-tensors"
    qmodel = fq.load("out")                       # QuantLinear modules, generate() works
"""

from . import calibration
from .api import quantize
from .blocks import BlockDiscoveryError
from .calls import NonFiniteActivationError
from .config import GPTQ, PRESET_SCHEMES, QuantizationArgs, QuantizationScheme
from .formats import CheckpointError, convert, load, save
from .modifiers import GPTQModifier, QuantizationModifier, UnreachedLayerError
from .nn import QuantLinear
from .report import LayerReport, QuantizationReport

__version__ = "0.1.0"

__all__ = [
    "GPTQ",
    "PRESET_SCHEMES",
    "BlockDiscoveryError",
    "CheckpointError",
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
