"""The in-memory result of quantizing one weight: what the pipeline attaches to each
quantized module (as ``module.fq_quant``) and what every checkpoint writer reads.

Codes are stored once, in ``nn.Linear`` orientation ``[out_features, in_features]`` (a GPT-2
``Conv1D`` weight is transposed first), so the GPTQ and compressed-tensors writers share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import QuantizationArgs

ATTR = "fq_quant"


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out, in], values in [0, 2**bits - 1]
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups], integers in [0, 2**bits - 1]
    g_idx: torch.Tensor  # int32 [in]: group of each input column
    args: QuantizationArgs

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale[g] * (code - zero[g])`` per column group, ``[out, in]``."""
        g = self.g_idx.long()
        scale = self.scales[:, g]
        zero = self.zeros[:, g].to(torch.float32)
        return (scale * (self.codes.to(torch.float32) - zero)).to(dtype)
