"""An independent torch re-implementation of the GPTQ reference algorithm (IST-DASLab
``gptq.py`` ``fasterquant`` + its ``Quantizer``), used as the yardstick for ferroquant.

Written from the paper's algorithm, step for step as the reference code orders it: explicit
inverse (Cholesky, ``cholesky_inverse``, upper Cholesky of the inverse), a per-column loop inside
lazy blocks, group grids found when a group starts (on the not-yet-block-updated weights, as the
reference does), act-order, static groups, symmetric/asymmetric, min-max and MSE grid search.

``dtype`` selects the arithmetic: float64 for tests, float32 for the side-by-side benchmarks
(``benches/bench_layer.py`` on CPU, ``benches/gpu_bench.py`` on the GPU: it runs on the inputs'
device), so all use the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class GridSpec:
    bits: int = 4
    symmetric: bool = True
    observer: str = "minmax"  # "mse", or "hessian_mse" (squared error weighted by diag(H))
    grid: int = 100
    maxshrink: float = 0.8
    norm: float = 2.4
    # Storage dtype of the scales (torch.float16 / torch.bfloat16): every scale is rounded to it
    # when computed, before its zero point and codes; None keeps the computing dtype.
    scale_dtype: torch.dtype | None = None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Dequantized ``scale * (clamp(round(x/scale) + zero, 0, maxq) - zero)``."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def codes_of(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def round_scale(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``scale`` rounded to ``dtype`` by torch's conversion (ties to even), in its own dtype; a
    positive scale that would round to 0 becomes the dtype's smallest positive (subnormal)."""
    if dtype is None:
        return scale
    r = scale.to(dtype).to(scale.dtype)
    tiny = torch.tensor(1, dtype=torch.int16).view(dtype).to(scale.dtype)
    return torch.where((r == 0) & (scale > 0), tiny, r)


def _zero(xmin: torch.Tensor, scale: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    zero = torch.round(-xmin / scale)
    # A rounded scale may sit below the exact one: the zero stays inside the grid.
    return zero if spec.scale_dtype is None else zero.clamp(0, spec.maxq)


def find_params(x: torch.Tensor, spec: GridSpec,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of ``x`` ``[rows, k]``, each ``[rows, 1]`` (reference Quantizer);
    ``weights`` ``[k]``: the ``hessian_mse`` observer's per-column weights (diag(H))."""
    maxq = spec.maxq
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1), xmax)
    scale = round_scale((xmax - xmin) / maxq, spec.scale_dtype)
    if spec.symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = _zero(xmin, scale, spec)
    if spec.observer in ("mse", "hessian_mse"):
        hessian = spec.observer == "hessian_mse"
        if hessian and weights is None:
            weights = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        best = torch.full([x.shape[0]], float("inf"), dtype=x.dtype, device=x.device)
        for i in range(int(spec.maxshrink * spec.grid)):
            p = 1 - i / spec.grid
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = round_scale((xmax1 - xmin1) / maxq, spec.scale_dtype)
            zero1 = _zero(xmin1, scale1, spec) if not spec.symmetric else zero
            d = quantize(x, scale1[:, None], zero1[:, None], maxq) - x
            err = ((d * d) * weights).sum(1) if hessian else d.abs().pow(spec.norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    elif spec.observer != "minmax":
        raise ValueError(f"unknown observer {spec.observer!r}")
    return scale[:, None], zero[:, None]


@dataclass
class RefResult:
    dequantized: torch.Tensor  # [rows, cols], original column order
    codes: torch.Tensor  # [rows, cols]
    scales: torch.Tensor  # [rows, n_groups]
    zeros: torch.Tensor  # [rows, n_groups]
    g_idx: torch.Tensor  # [cols]
    perm: torch.Tensor | None


def _prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs: ``H_ii = 1`` and the weight column zeroed (the reference's convention)."""
    dead = torch.diag(h) == 0
    h = h.clone()
    w = w.clone()
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def gptq_reference(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: GridSpec,
    *,
    group_size: int = -1,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float64,
    timings: dict[str, float] | None = None,
) -> RefResult:
    """The reference ``fasterquant`` in ``dtype``; raises torch's error if H + damp is not PD.
    ``timings`` (optional) receives the seconds spent in "inverse" and "columns"."""
    t0 = time.perf_counter()
    w, h = _prepare(weight.to(dtype), hessian.to(dtype))
    _rows, cols = w.shape
    maxq = spec.maxq

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups and group_size != -1:
        hd = torch.diag(h)
        static = [find_params(w[:, i : i + group_size], spec, hd[i : i + group_size])
                  for i in range(0, cols, group_size)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    hdiag = torch.diag(h).clone()  # processing order: the hessian_mse observer's weights
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(cols, device=h.device)
    h[idx, idx] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    t1 = time.perf_counter()

    q_all = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    # Grid used by each processed position; groups are recorded in the order they are found.
    col_group = torch.zeros(cols, dtype=torch.long, device=w.device)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale, zero = find_params(w, spec, hdiag) if group_size == -1 else (None, None)
    if group_size == -1:
        scales, zeros = [scale], [zero]

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        # The reference reads W, which lacks this block's in-block updates.
                        scale, zero = find_params(w[:, i1 + i : i1 + i + group_size], spec,
                                                  hdiag[i1 + i : i1 + i + group_size])
                        scales.append(scale)
                        zeros.append(zero)
                    col_group[i1 + i] = len(scales) - 1
                else:
                    orig = int(perm[i1 + i]) if perm is not None else i1 + i
                    scale, zero = static[orig // group_size]
                    col_group[i1 + i] = orig // group_size
            q = quantize(col[:, None], scale, zero, maxq).flatten()
            codes[:, i1 + i] = codes_of(col[:, None], scale, zero, maxq).flatten()
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if timings is not None:
        timings["inverse"] = t1 - t0
        timings["columns"] = time.perf_counter() - t1
    if static_groups and group_size != -1:
        scales = [s for s, _ in static]
        zeros = [z for _, z in static]
    if perm is not None:
        inv = torch.argsort(perm)
        q_all = q_all[:, inv]
        codes = codes[:, inv]
        col_group = col_group[inv]
    return RefResult(
        dequantized=q_all,
        codes=codes,
        scales=torch.cat(scales, 1),
        zeros=torch.cat(zeros, 1),
        g_idx=col_group,
        perm=perm,
    )


def rtn_reference(
    weight: torch.Tensor,
    spec: GridSpec,
    *,
    group_size: int = -1,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Round-to-nearest with the same grids; returns the dequantized weight."""
    w = weight.to(dtype)
    cols = w.shape[1]
    g = cols if group_size == -1 else group_size
    out = torch.empty_like(w)
    for i in range(0, cols, g):
        scale, zero = find_params(w[:, i : i + g], spec)
        out[:, i : i + g] = quantize(w[:, i : i + g], scale, zero, spec.maxq)
    return out


def proxy_loss(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W-Q) H (W-Q)^T)`` in float64 (dead columns: H's row/column is zero, so they add 0)."""
    d = weight.double() - dequantized.double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))


def correlated_activations(
    tokens: int, n: int, *, seed: int = 0, decay: float = 4.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``x = z @ A`` (float32 result) with a random mixing matrix whose singular values decay
    from 1 to ``exp(-decay)``, per-feature scales and a few outlier features: activations
    correlated like a transformer's, not white noise. ``dtype`` is the generation arithmetic."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    s = torch.exp(-decay * torch.arange(n, dtype=dtype) / max(n - 1, 1))
    feat = torch.exp(0.5 * torch.randn(n, generator=g, dtype=dtype))
    feat[torch.randperm(n, generator=g)[: max(1, n // 64)]] *= 8
    a = ((u * s) @ v.T) * feat
    z = torch.randn(tokens, n, generator=g, dtype=dtype)
    return (z @ a).float()
