"""``QuantLinear``: inference on saved integer codes (CPU and CUDA).

The codes are unpacked once, when the layer is built from a checkpoint; the dequantized
weight ``scale[g] * (code - zero[g])`` is then materialised once per device/dtype and cached,
so a forward pass is a single ``F.linear`` (the same matmul the in-memory quantized model
runs, hence equal outputs). ``cache_weight=False`` trades speed for memory: the weight is
rebuilt on every call with one vectorised gather (no Python loop over groups).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantizationArgs
from .quantized import QuantizedWeight

_QUANT_BUFFERS = ("codes", "scales", "zeros", "g_idx")


class QuantLinear(nn.Module):
    """A Linear layer whose weight is ``scales[:, g_idx] * (codes - zeros[:, g_idx])``.

    Buffers: ``codes`` uint8 [out, in], ``scales`` float32 [out, ng], ``zeros`` int32
    [out, ng], ``g_idx`` int32 [in]; parameter ``bias`` [out] in the compute dtype or None.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        args: QuantizationArgs,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        cache_weight: bool = True,
    ) -> None:
        super().__init__()
        out_f, in_f = codes.shape
        ng = scales.shape[1]
        if scales.shape != (out_f, ng) or zeros.shape != (out_f, ng) or g_idx.shape != (in_f,):
            raise ValueError(
                f"QuantLinear: inconsistent shapes codes {list(codes.shape)}, scales "
                f"{list(scales.shape)}, zeros {list(zeros.shape)}, g_idx {list(g_idx.shape)}"
            )
        self.in_features = int(in_f)
        self.out_features = int(out_f)
        self.args = args
        self.compute_dtype = dtype
        self.cache_weight = cache_weight
        self.register_buffer("codes", codes.to(torch.uint8).contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("zeros", zeros.to(torch.int32).contiguous(), persistent=False)
        self.register_buffer("g_idx", g_idx.to(torch.int32).contiguous(), persistent=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None = None, *,
        dtype: torch.dtype = torch.float32, cache_weight: bool = True,
    ) -> QuantLinear:
        return cls(q.codes, q.scales, q.zeros, q.g_idx, q.args, bias, dtype=dtype, cache_weight=cache_weight)

    @property
    def fq_quant(self) -> QuantizedWeight:
        """The codes as a ``QuantizedWeight``, so a loaded model can be saved again."""
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.g_idx, self.args)

    def _contiguous_groups(self) -> int:
        """Group width when column i is in group i // width for equal-width groups, else 0."""
        ng = self.scales.shape[1]
        if self.in_features % ng:
            return 0
        width = self.in_features // ng
        ref = torch.arange(self.in_features, device=self.g_idx.device, dtype=torch.int32) // width
        return width if torch.equal(self.g_idx, ref) else 0

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out, in]``; computed in float32 then cast (as the in-memory
        ``QuantizedWeight.dequantize`` does, so both agree bit for bit)."""
        dtype = dtype or self.compute_dtype
        out_f, ng = self.scales.shape
        width = self._contiguous_groups()
        if width:  # broadcast per group instead of gathering a full-size scale matrix
            w = self.codes.view(out_f, ng, width).to(torch.float32)
            w.sub_(self.zeros.unsqueeze(-1)).mul_(self.scales.unsqueeze(-1))  # in place: one buffer
            return w.view(out_f, self.in_features).to(dtype)
        g = self.g_idx.long()
        scale = self.scales.index_select(1, g)
        zero = self.zeros.index_select(1, g).to(torch.float32)
        return (scale * (self.codes.to(torch.float32) - zero)).to(dtype)

    def weight_for_forward(self) -> torch.Tensor:
        if self._weight is not None:
            return self._weight
        w = self.dequantize()
        if self.cache_weight:
            self._weight = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for_forward(), self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:  # type: ignore[override]
        # .to()/.cuda()/.half(): the integer codes and float32 scales only change device; the
        # compute dtype follows what fn does to a float tensor; the cached weight is dropped.
        dev_probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.codes.device))
        saved = {n: self._buffers.pop(n) for n in _QUANT_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in saved.items():
                self._buffers[n] = t.to(dev_probe.device)
        if dev_probe.dtype.is_floating_point:
            self.compute_dtype = dev_probe.dtype
        self._weight = None
        return self

    def extra_repr(self) -> str:
        a = self.args
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={a.num_bits}, group_size={a.effective_group_size}, sym={a.symmetric}, dtype={self.compute_dtype}"
        )
