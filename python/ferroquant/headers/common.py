"""Rules every checkpoint format shares, without torch: the format and GPTQ version names
(every accepted spelling), which format a ``quantization_config`` describes, and the number
of scale groups of a layer."""

from __future__ import annotations

import math
from typing import Any

# Every spelling accepted anywhere (API, CLI, a checkpoint's config) -> the canonical name.
FORMAT_ALIASES = {
    "gptq": "gptq",
    "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
    "ct": "compressed-tensors",
    "pack-quantized": "compressed-tensors",
}
CHECKPOINT_FORMAT_ALIASES = {
    "gptq": "gptq", "gptq_v1": "gptq", "gptq-v1": "gptq", "v1": "gptq",
    "gptq_v2": "gptq_v2", "gptq-v2": "gptq_v2", "v2": "gptq_v2",
}


def canonical_format(fmt: str) -> str:
    """'gptq' or 'compressed-tensors' for any accepted spelling; ValueError otherwise."""
    f = FORMAT_ALIASES.get(str(fmt).lower())
    if f is None:
        raise ValueError(f"format {fmt!r}: expected 'gptq' or 'compressed-tensors'")
    return f


def canonical_checkpoint_format(checkpoint_format: str) -> str:
    """'gptq' (v1) or 'gptq_v2' for any accepted spelling; ValueError otherwise."""
    cf = CHECKPOINT_FORMAT_ALIASES.get(str(checkpoint_format).lower())
    if cf is None:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected 'gptq' / 'v1' "
                         "or 'gptq_v2' / 'v2'")
    return cf


def format_of(quantization_config: dict[str, Any]) -> str | None:
    """'gptq' or 'compressed-tensors' for a checkpoint's ``quantization_config`` (GPTQ configs
    from older writers carry ``bits`` and no ``quant_method``); None for anything else."""
    method = str(quantization_config.get("quant_method") or quantization_config.get("method")
                 or "").lower()
    if method == "gptq" or (not method and "bits" in quantization_config):
        return "gptq"
    if method == "compressed-tensors":
        return "compressed-tensors"
    return None


def n_groups_for(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)
