"""Typed torch-facing wrapper over the activation observers and fake-quantization kernels of
``ferroquant._core``.

Tensors cross into Rust as numpy views (bfloat16 as its int16 bit pattern plus a dtype flag,
as in :mod:`ferroquant.solver`); leading dimensions are flattened, so ``[batch, seq, hidden]``
is read as ``[batch * seq, hidden]`` rows. CUDA tensors are moved to the CPU and results moved
back. Quantize-dequantize is computed in float32 and returned in the input's dtype.

Conventions are compressed-tensors' (signed codes ``[-2^(b-1), 2^(b-1) - 1]``):

* int symmetric: ``scale = max(|min|, |max|) / ((2^b - 1) / 2)``, zero point 0;
* int asymmetric: ``scale = (max - min) / (2^b - 1)``,
  ``zero = round(clamp(qmin - min / scale, qmin, qmax))``;
* FP8 E4M3: ``scale = absmax / 448``;
* ranges always include 0; a zero scale becomes float32 eps.

Strategies: ``tensor`` (one scale), ``token`` (one per row), ``channel`` (one per column, the
feature axis of activations; ``channel_axis=0`` gives one per row, what a weight ``[out, in]``
needs), ``group`` (per row and ``group_size`` consecutive columns).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from . import _core

ObserverName = Literal["minmax", "static_minmax", "moving_average_minmax", "mse"]
StrategyName = Literal["tensor", "channel", "token", "group"]
TypeName = Literal["int", "float"]

__all__ = [
    "Observer",
    "dynamic_token_fake_quantize",
    "fake_quantize_fp8",
    "fake_quantize_int",
]


def _rows(x: torch.Tensor, arg: str) -> tuple[torch.Tensor, np.ndarray, str | None]:
    """``x`` as a contiguous CPU ``[rows, columns]`` tensor and the numpy array handed to Rust."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(x).__name__}")
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_floating_point():
        raise ValueError(f"{arg}: expected a floating-point tensor, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{arg}: expected at least one dimension, got a scalar")
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t, t.view(torch.int16).numpy(), "bf16"
    if t.dtype in (torch.float16, torch.float32):
        return t, t.numpy(), None
    t = t.to(torch.float32)
    return t, t.numpy(), None


def _params(t: torch.Tensor | float, arg: str, dtype: torch.dtype) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([t], dtype=dtype)
    t = t.detach().cpu()
    if dtype.is_floating_point != t.is_floating_point():
        raise ValueError(f"{arg}: expected a {dtype} tensor, got {t.dtype}")
    if not dtype.is_floating_point and t.numel():
        info = torch.iinfo(dtype)
        if int(t.min()) < info.min or int(t.max()) > info.max:
            raise ValueError(f"{arg}: values must fit {dtype}")
    return t.to(dtype).contiguous().reshape(-1).numpy()


def _out(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(a).reshape(like.shape).to(like.dtype)
    return t if like.device.type == "cpu" else t.to(like.device)


class Observer:
    """Streaming range statistics of one tensor kind of one module.

    ``update(x)`` folds a batch ``[..., columns]`` in; ``scale_zero_point()`` gives float32
    scales and int32 zero points shaped ``[1, 1]`` (tensor), ``[rows, 1]`` (token, or channel
    with ``channel_axis=0``), ``[1, columns]`` (channel) or ``[rows, groups]`` (group). Per-row
    strategies need the same number of rows in every batch.

    Observers: ``minmax`` and ``static_minmax`` keep the absolute min/max over all batches;
    ``moving_average_minmax`` updates ``m <- m + c * (batch_min - m)`` (first batch sets ``m``);
    ``mse`` tries ranges ``p * [min, max]`` for ``p = 1 - i / grid``,
    ``i < floor(maxshrink * grid)`` of the running range and keeps, per scale, the ``p`` whose
    ``sum |x - qdq(x)|^norm`` summed over all batches is smallest (each batch judged against the
    running range after it was merged; no early stopping).
    """

    def __init__(
        self,
        columns: int,
        observer: ObserverName = "minmax",
        *,
        strategy: StrategyName = "tensor",
        type: TypeName = "int",  # llm-compressor's argument name
        num_bits: int = 8,
        symmetric: bool = True,
        group_size: int | None = None,
        channel_axis: int = 1,
        averaging_constant: float = 0.01,
        grid: int = 100,
        maxshrink: float = 0.2,
        norm: float = 2.4,
    ) -> None:
        self._obs = _core.Observer(
            columns,
            observer,
            strategy=strategy,
            type=type,
            num_bits=num_bits,
            symmetric=symmetric,
            group_size=group_size,
            channel_axis=channel_axis,
            averaging_constant=averaging_constant,
            grid=grid,
            maxshrink=maxshrink,
            norm=norm,
        )

    @property
    def columns(self) -> int:
        return int(self._obs.columns)

    @property
    def batches(self) -> int:
        return int(self._obs.batches)

    def update(self, x: torch.Tensor) -> None:
        """Folds ``x`` (``[..., columns]``, any float dtype, leading dimensions flattened) in."""
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] != self.columns:
            raise ValueError(f"x: expected shape [..., {self.columns}], got {list(x.shape)}")
        _, a, dt = _rows(x, "x")
        self._obs.update(a, dt)

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 scales, int32 zero points); ValueError before the first batch."""
        s, z = self._obs.scale_zero_point()
        return torch.from_numpy(s), torch.from_numpy(z)

    def min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 range the scales come from (for ``mse`` the chosen shrunk range)."""
        lo, hi = self._obs.min_max()
        return torch.from_numpy(lo), torch.from_numpy(hi)

    def __repr__(self) -> str:
        return repr(self._obs)


def fake_quantize_int(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None = None,
    *,
    num_bits: int = 8,
    strategy: StrategyName = "tensor",
    group_size: int | None = None,
    channel_axis: int = 1,
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with round half to even, signed codes;
    ``scale``/``zero_point`` hold the strategy's number of values (any shape, row-major over
    the rows of ``x`` flattened to 2-D). ``zero_point=None`` means symmetric (0)."""
    _, a, dt = _rows(x, "x")
    s = _params(scale, "scale", torch.float32)
    z = None if zero_point is None else _params(zero_point, "zero_point", torch.int32)
    out = _core.fake_quantize_int(
        a,
        s,
        z,
        num_bits=num_bits,
        strategy=strategy,
        group_size=group_size,
        channel_axis=channel_axis,
        dtype=dt,
    )
    return _out(out, x)


def fake_quantize_fp8(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    strategy: StrategyName = "tensor",
    group_size: int | None = None,
    channel_axis: int = 1,
) -> torch.Tensor:
    """``float8_e4m3fn(clamp(x / s, -448, 448)) * s`` (round to nearest even; NaN stays NaN)."""
    _, a, dt = _rows(x, "x")
    s = _params(scale, "scale", torch.float32)
    out = _core.fake_quantize_fp8(
        a, s, strategy=strategy, group_size=group_size, channel_axis=channel_axis, dtype=dt
    )
    return _out(out, x)


def dynamic_token_fake_quantize(
    x: torch.Tensor,
    *,
    type: TypeName = "int",  # llm-compressor's argument name
    num_bits: int = 8,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (per row of ``x`` flattened to ``[tokens, hidden]``) scales from each row's
    min/max, applied in one pass. Returns ``(qdq(x) in x's dtype and shape, float32 scales
    [tokens, 1], int32 zero points [tokens, 1])``; NaN/inf in ``x`` is a ValueError."""
    _, a, dt = _rows(x, "x")
    out, s, z = _core.dynamic_token_fake_quantize(
        a, type=type, num_bits=num_bits, symmetric=symmetric, dtype=dt
    )
    return _out(out, x), torch.from_numpy(s), torch.from_numpy(z)
