"""Quantized Linear layers for inference (CPU and CUDA): :class:`QuantLinear` on packed integer
codes and :class:`Float8Linear` on FP8 E4M3 codes.

``QuantLinear`` keeps the codes packed in int32 words (``bits`` per code), with the scales, zero
points and ``g_idx``: a 4-bit layer holds about a quarter of an fp16 weight's memory. Each
forward dequantizes the weight (``scale[g] * (code - zero[g])`` in float32, then cast: the
rule of :func:`ferroquant.quantized.dequantize`, so results equal the in-memory quantized
model's) a chunk of output rows at a time, which bounds the temporaries to one chunk beside the
layer's weight in the compute dtype, then runs a single ``F.linear``. ``cache_dequantized=True``
keeps that weight between calls instead (the speed of ``nn.Linear``, the memory of the float
weight on top of the codes). ``Float8Linear`` does the same with one byte per weight and one
scale per tensor or per output channel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import solver
from .config import QuantizationArgs
from .quantized import QuantizedWeight, dequantize, group_width

# Elements dequantized per chunk of output rows: bounds the int and float32 temporaries of a
# forward to a few tens of MB whatever the layer's size.
CHUNK_ELEMENTS = 1 << 22


def packed_words(in_features: int, bits: int) -> int:
    return (in_features * bits + 31) // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[out, ceil(in*bits/32)]``: each row's codes as a little-endian bit stream (code
    ``i`` in stream bits ``i*bits ..``, stream bit ``p`` in bit ``p % 32`` of word ``p // 32``),
    the compressed-tensors ``weight_packed`` layout."""
    if not codes.numel():  # (the core refuses empty input)
        return torch.zeros(codes.shape[0], packed_words(codes.shape[1], bits), dtype=torch.int32, device=codes.device)
    return solver.pack_ct_weight(codes.to(torch.uint8), bits)


class _Unpacker:
    """Unpacks rows of :func:`pack_codes` words with torch bit ops (on accelerators; the CPU
    uses the core's unpacker)."""

    def __init__(self, in_features: int, bits: int, device: torch.device) -> None:
        self.in_features, self.mask, self.device = in_features, (1 << bits) - 1, device
        if 32 % bits == 0:  # no code straddles a word: shift each word by every slot
            self.shifts: torch.Tensor | None = torch.arange(0, 32, bits, dtype=torch.int32, device=device)
        else:
            self.shifts = None
            pos = torch.arange(in_features, device=device, dtype=torch.int64) * bits
            self.word, self.off = pos // 32, pos % 32
            n_words = packed_words(in_features, bits)
            self.next_word = (self.word + 1).clamp(max=n_words - 1)

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        """Integer codes ``[rows, in]`` (int32 or int64)."""
        rows = packed.shape[0]
        if self.shifts is not None:
            v = (packed.unsqueeze(-1) >> self.shifts).bitwise_and_(self.mask)
            return v.view(rows, -1)[:, : self.in_features]
        lo = packed.index_select(1, self.word).to(torch.int64).bitwise_and_(0xFFFFFFFF)
        hi = packed.index_select(1, self.next_word).to(torch.int64).bitwise_and_(0xFFFFFFFF)
        return lo.bitwise_or_(hi << 32).bitwise_right_shift_(self.off).bitwise_and_(self.mask)


class QuantizedLinear(nn.Module):
    """What both quantized Linear kinds share: the forward on the dequantized weight, the
    opt-in cache of it, and moves that keep the codes and float32 scales in their dtypes."""

    _QUANT_BUFFERS: tuple[str, ...] = ()

    def __init__(self, out_f: int, in_f: int, args: QuantizationArgs, bias: torch.Tensor | None,
                 dtype: torch.dtype, cache_dequantized: bool) -> None:
        super().__init__()
        self.in_features = int(in_f)
        self.out_features = int(out_f)
        self.args = args
        self.compute_dtype = dtype
        self.cache_dequantized = cache_dequantized
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._weight: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def weight_for_forward(self) -> torch.Tensor:
        if self._weight is not None:
            return self._weight
        w = self.dequantize()
        if self.cache_dequantized:
            self._weight = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for_forward(), self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:  # type: ignore[override]
        # .to()/.cuda()/.half(): the codes and float32 scales only change device; the compute
        # dtype follows what fn does to a float tensor; the cached weight is dropped.
        device = self._buffers[self._QUANT_BUFFERS[0]].device
        dev_probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        saved = {n: self._buffers.pop(n) for n in self._QUANT_BUFFERS}
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
        kind = (f"fp8 per-{a.strategy}" if a.type == "float" else
                f"bits={a.num_bits}, group_size={a.effective_group_size}, sym={a.symmetric}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}, dtype={self.compute_dtype}, cache_dequantized={self.cache_dequantized}"
        )


class QuantLinear(QuantizedLinear):
    """A Linear layer whose weight is ``scales[:, g_idx] * (codes - zeros[:, g_idx])``.

    Buffers: ``packed`` int32 ``[out, ceil(in*bits/32)]`` (:func:`pack_codes`), ``scales``
    float32 ``[out, ng]``, ``zeros`` int32 ``[out, ng]``, ``g_idx`` int32 ``[in]``; parameter
    ``bias`` ``[out]`` in the compute dtype or None. ``codes`` unpacks on demand.
    ``cache_dequantized=True`` keeps the dequantized weight after the first forward.
    """

    _QUANT_BUFFERS = ("packed", "scales", "zeros", "g_idx")

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
        cache_dequantized: bool = False,
    ) -> None:
        out_f, in_f = codes.shape
        ng = scales.shape[1]
        if scales.shape != (out_f, ng) or zeros.shape != (out_f, ng) or g_idx.shape != (in_f,):
            raise ValueError(
                f"QuantLinear: inconsistent shapes codes {list(codes.shape)}, scales "
                f"{list(scales.shape)}, zeros {list(zeros.shape)}, g_idx {list(g_idx.shape)}"
            )
        bits = int(args.num_bits)
        if codes.numel() and int(codes.max()) >> bits:
            raise ValueError(f"QuantLinear: codes exceed {(1 << bits) - 1} for {bits} bits")
        super().__init__(out_f, in_f, args, bias, dtype, cache_dequantized)
        self.bits = bits
        self.register_buffer("packed", pack_codes(codes, bits).contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("zeros", zeros.to(torch.int32).contiguous(), persistent=False)
        self.register_buffer("g_idx", g_idx.to(torch.int32).contiguous(), persistent=False)
        self._group_width = group_width(self.g_idx, ng)
        self._unpacker: _Unpacker | None = None

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None = None, *,
        dtype: torch.dtype = torch.float32, cache_dequantized: bool = False,
    ) -> QuantLinear:
        return cls(q.codes, q.scales, q.zeros, q.g_idx, q.args, bias, dtype=dtype,
                   cache_dequantized=cache_dequantized)

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if packed.device.type == "cpu":  # the core's unpacker: >10x faster than torch bit ops
            return solver.unpack_ct_weight(packed, self.bits, self.in_features)
        u = self._unpacker
        if u is None or u.device != packed.device:  # index tensors live where the words do
            u = self._unpacker = _Unpacker(self.in_features, self.bits, packed.device)
        return u(packed)

    @property
    def codes(self) -> torch.Tensor:
        """uint8 ``[out, in]``, unpacked from ``packed``."""
        return self._unpack(self.packed).to(torch.uint8)

    @property
    def fq_quant(self) -> QuantizedWeight:
        """The codes as a ``QuantizedWeight``, so a loaded model can be saved again."""
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.g_idx, self.args)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default: the compute dtype), dequantized a
        chunk of output rows at a time."""
        dtype = dtype or self.compute_dtype
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.packed.device)
        step = max(1, CHUNK_ELEMENTS // max(1, self.in_features))
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            dequantize(self._unpack(self.packed[r0:r1]), self.scales[r0:r1], self.zeros[r0:r1],
                       self.g_idx, dtype, width=self._group_width, out=out[r0:r1])
        return out


class Float8Linear(QuantizedLinear):
    """A Linear layer whose weight is ``scales * codes`` with FP8 E4M3 ``codes`` ``[out, in]``
    and float32 ``scales`` ``[out, 1]`` (per channel) or ``[1, 1]`` (per tensor); parameter
    ``bias`` as :class:`QuantLinear`'s."""

    _QUANT_BUFFERS = ("codes", "scales")

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        args: QuantizationArgs,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        cache_dequantized: bool = False,
    ) -> None:
        out_f, in_f = codes.shape
        if codes.dtype != torch.float8_e4m3fn:
            raise ValueError(f"Float8Linear: codes must be float8_e4m3fn, got {codes.dtype}")
        if scales.dim() != 2 or scales.shape[1] != 1 or scales.shape[0] not in (1, out_f):
            raise ValueError(f"Float8Linear: scales {list(scales.shape)} must be [{out_f}, 1] "
                             "(per channel) or [1, 1] (per tensor)")
        super().__init__(out_f, in_f, args, bias, dtype, cache_dequantized)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(torch.float32).contiguous(), persistent=False)

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None = None, *,
        dtype: torch.dtype = torch.float32, cache_dequantized: bool = False,
    ) -> Float8Linear:
        return cls(q.codes, q.scales, q.args, bias, dtype=dtype, cache_dequantized=cache_dequantized)

    @property
    def fq_quant(self) -> QuantizedWeight:
        """The codes as a ``QuantizedWeight`` (zero points 0, one group), so a loaded model can
        be saved again."""
        zeros = torch.zeros(self.scales.shape, dtype=torch.int32, device=self.codes.device)
        g_idx = torch.zeros(self.in_features, dtype=torch.int32, device=self.codes.device)
        return QuantizedWeight(self.codes, self.scales, zeros, g_idx, self.args)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default: the compute dtype)."""
        return self.fq_quant.dequantize(dtype or self.compute_dtype)
