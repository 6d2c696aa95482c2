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
        """``scale[g] * (code - zero[g])`` per column group, ``[out, in]`` (see :func:`dequantize`)."""
        return dequantize(self.codes, self.scales, self.zeros, self.g_idx, dtype)


def group_width(g_idx: torch.Tensor, n_groups: int) -> int:
    """Width ``w`` when input column ``i`` is in group ``i // w`` for equal-width groups, else 0."""
    in_f = int(g_idx.shape[0])
    if n_groups <= 0 or in_f % n_groups:
        return 0
    width = in_f // n_groups
    ref = torch.arange(in_f, device=g_idx.device, dtype=g_idx.dtype) // width
    return width if torch.equal(g_idx, ref) else 0


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    width: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one dequantization rule: ``scale[g] * (code - zero[g])`` computed in float32, then
    cast to ``dtype`` -- for the in-memory quantized model, loaded ``QuantLinear`` layers and
    checkpoint checks alike, so they agree bit for bit.

    ``codes`` is any integer tensor ``[rows, in]`` (rows may be a slice of the output rows,
    with the matching rows of ``scales``/``zeros`` ``[rows, n_groups]``); ``g_idx`` ``[in]``.
    ``width`` is :func:`group_width` when the caller already knows it. ``out`` (contiguous,
    ``[rows, in]`` of ``dtype``) receives the result instead of a new tensor.
    """
    rows, in_f = codes.shape
    ng = scales.shape[1]
    scales = scales.to(torch.float32)
    if width is None:
        width = group_width(g_idx, ng)
    if width:  # equal contiguous groups: broadcast per group instead of gathering [rows, in]
        if out is not None and dtype == torch.float32:
            w = out.view(rows, ng, width)  # computed in place: no temporary at all
            w.copy_(codes.reshape(rows, ng, width))
        else:
            w = codes.reshape(rows, ng, width).to(torch.float32, copy=True)
        w.sub_(zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1))  # in place: one float32 buffer
        res = w.view(rows, in_f)
    else:
        g = g_idx.long()
        scale = scales.index_select(1, g)
        zero = zeros.index_select(1, g).to(torch.float32)
        res = scale * (codes.to(torch.float32) - zero)
    if out is None:
        return res.to(dtype)
    if res.data_ptr() != out.data_ptr():
        out.copy_(res)  # the cast, as .to(dtype) does it
    return out
