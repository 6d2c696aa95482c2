"""Activation observers and fake quantization against torch / compressed-tensors references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ferroquant import _core
from ferroquant import observers as fo

STRATEGIES = [
    ("tensor", None, 1),
    ("token", None, 1),
    ("channel", None, 1),
    ("channel", None, 0),
    ("group", 4, 1),
    ("group", 3, 1),  # 10 columns: a short last group
]
FORMATS = [
    ("int", 8, True),
    ("int", 8, False),
    ("int", 4, True),
    ("int", 4, False),
    ("float", 8, True),
]


def data(seed: int, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.linspace(0.5, 3.0, cols) + 0.3
    x.view(-1)[::53] *= 8.0  # outliers
    return x


def layout(strategy: str, group_size: int | None, axis: int, rows: int, cols: int):
    """Maps a [rows, cols] tensor to [params, values-per-param] views (reference layout)."""

    def groups(x: torch.Tensor) -> list[torch.Tensor]:
        if strategy == "tensor":
            return [x.reshape(-1)]
        if strategy == "token" or (strategy == "channel" and axis == 0):
            return list(x)
        if strategy == "channel":
            return list(x.T)
        assert group_size is not None
        return [x[r, c : c + group_size] for r in range(rows) for c in range(0, cols, group_size)]

    return groups


def ct_qparams(lo: torch.Tensor, hi: torch.Tensor, kind: str, bits: int, sym: bool):
    """compressed-tensors' own scale / zero-point rule (the reference)."""
    # Only the tests that need it skip when compressed-tensors is absent.
    ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    ct_args = pytest.importorskip("compressed_tensors.quantization.quant_args")
    args = ct_args.QuantizationArgs(num_bits=bits, type=kind, symmetric=sym)
    s, z = ct_helpers.calculate_qparams(lo, hi, args)
    return s.reshape(-1).float(), z.reshape(-1).to(torch.int32)


def torch_qdq(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, kind: str, bits: int
) -> torch.Tensor:
    if kind == "float":
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, NaNs (of any payload/sign) equal to each other."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(na, nb)) and bool(
        torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))
    )


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------


def fp8_edge_values() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[~torch.isnan(codes)].sort().values
    mids = (finite[1:] + finite[:-1]) / 2  # exact ties between neighbours
    around = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    neighbours = torch.cat(
        [torch.nextafter(finite, finite + 1), torch.nextafter(finite, finite - 1)]
    )
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            448.0,
            -448.0,
            449.0,
            464.0,
            -464.0,
            480.0,
            1e30,
            -1e30,
            math.inf,
            -math.inf,
            math.nan,
            2.0**-9,
            2.0**-10,
            3 * 2.0**-11,
            1e-40,
            -1e-42,
        ]
    )
    return torch.cat([finite, mids, around, neighbours, specials]).float()


@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0**-7, 1e-3])
def test_fp8_qdq_equals_torch_cast_bit_for_bit(scale: float) -> None:
    edge = fp8_edge_values() * scale
    g = torch.Generator().manual_seed(1)
    rnd = torch.randn(20000, generator=g) * torch.logspace(-4, 3, 20000)
    x = torch.cat([edge, rnd]).float()
    x = torch.cat([x, torch.zeros((-x.numel()) % 16)]).reshape(-1, 16)
    s = torch.tensor([scale], dtype=torch.float32)
    got = fo.fake_quantize_fp8(x, s)
    assert same_bits(got, torch_qdq(x, s, torch.zeros(1), "float", 8))


def test_fp8_qdq_per_token_and_per_channel_scales() -> None:
    x = data(2, 64, 48)
    for strategy, axis, shape in [
        ("token", 1, (64, 1)),
        ("channel", 1, (1, 48)),
        ("channel", 0, (64, 1)),
    ]:
        s = (x.abs().amax(dim=1 if shape[1] == 1 else 0, keepdim=True) / 300).float()
        got = fo.fake_quantize_fp8(x, s, strategy=strategy, channel_axis=axis)
        assert same_bits(got, torch_qdq(x, s, torch.zeros(1), "float", 8)), strategy


# ---------------------------------------------------------------------------------------------
# Int
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "sym"), [(8, True), (8, False), (4, True), (4, False), (2, False)]
)
def test_int_qdq_equals_torch_formula(bits: int, sym: bool) -> None:
    x = data(3, 96, 40)
    # Exact ties of x / s (s = 0.5): torch.round and the kernel both go half to even.
    x[0, :8] = torch.tensor([0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 1e30, -1e30])
    x[1, 0] = math.nan
    half = 2 ** (bits - 1)
    for strategy, gs, axis, n, view in [
        ("tensor", None, 1, 1, (1, 1)),
        ("token", None, 1, 96, (96, 1)),
        ("channel", None, 1, 40, (1, 40)),
        ("channel", None, 0, 96, (96, 1)),
    ]:
        g = torch.Generator().manual_seed(n)
        s = (torch.rand(n, generator=g) * 0.2 + 0.05).float()
        if n == 1:
            s[0] = 0.5
        z = torch.randint(-half, half, (n,), generator=g, dtype=torch.int32) if not sym else None
        got = fo.fake_quantize_int(x, s, z, num_bits=bits, strategy=strategy, channel_axis=axis)
        zz = torch.zeros(n, dtype=torch.int32) if z is None else z
        want = torch_qdq(x, s.reshape(view), zz.reshape(view).float(), "int", bits)
        assert same_bits(got, want), strategy


def test_int_group_qdq_equals_torch_formula() -> None:
    x = data(4, 32, 10)
    gs = 4
    g = torch.Generator().manual_seed(4)
    s = (torch.rand(32, 3, generator=g) * 0.2 + 0.05).float()
    z = torch.randint(-128, 128, (32, 3), generator=g, dtype=torch.int32)
    got = fo.fake_quantize_int(x, s, z, strategy="group", group_size=gs)
    expand = torch.arange(10) // gs
    want = torch_qdq(x, s[:, expand], z[:, expand].float(), "int", 8)
    assert same_bits(got, want)


# ---------------------------------------------------------------------------------------------
# Dynamic per token
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "bits", "sym"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dynamic_token_equals_torch_reference(
    kind: str, bits: int, sym: bool, dtype: torch.dtype
) -> None:
    x = data(5, 2 * 37, 64).reshape(2, 37, 64).to(dtype)
    x[0, 3] = 0.0  # an all-zero token: scale eps
    out, s, z = fo.dynamic_token_fake_quantize(x, type=kind, num_bits=bits, symmetric=sym)
    xf = x.float().reshape(-1, 64)
    rs, rz = ct_qparams(xf.amin(dim=1), xf.amax(dim=1), kind, bits, sym)
    assert same_bits(s.reshape(-1), rs)
    assert torch.equal(z.reshape(-1), rz)
    want = torch_qdq(xf, rs[:, None], rz[:, None].float(), kind, bits).to(dtype).reshape(x.shape)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# Observers
# ---------------------------------------------------------------------------------------------


def ref_minmax(batches: list[torch.Tensor], groups, kind: str, c: float = 0.01):
    lo = hi = None
    for x in batches:
        blo = torch.stack([g.min() for g in groups(x)])
        bhi = torch.stack([g.max() for g in groups(x)])
        if lo is None:
            lo, hi = blo, bhi
        elif kind == "moving_average_minmax":
            lo = lo + c * (blo - lo)
            hi = hi + c * (bhi - hi)
        else:
            lo, hi = torch.minimum(lo, blo), torch.maximum(hi, bhi)
    return lo, hi


def ref_mse(batches, groups, kind, bits, sym, grid=100, maxshrink=0.2, norm=2.4):
    """Brute force in torch: candidates p * running range (after each batch), errors summed over
    batches, first minimum wins."""
    steps = math.floor(maxshrink * grid)
    lo = hi = None
    err = None
    for x in batches:
        blo, bhi = ref_minmax([x], groups, "minmax")
        lo = blo if lo is None else torch.minimum(lo, blo)
        hi = bhi if hi is None else torch.maximum(hi, bhi)
        e = torch.zeros(len(lo), steps, dtype=torch.float64)
        for k in range(steps):
            p = 1 - k / grid
            s, z = ct_qparams(p * lo, p * hi, kind, bits, sym)
            for j, g in enumerate(groups(x)):
                q = torch_qdq(g, s[j], z[j].float(), kind, bits)
                e[j, k] = (q - g).abs().double().pow(norm).sum()
        err = e if err is None else err + e
    best = torch.tensor([int(torch.argmin(r)) for r in err])  # argmin: first of equal minima
    p = torch.tensor([1 - int(k) / grid for k in best], dtype=torch.float32)
    return p * lo, p * hi, err, best


@pytest.mark.parametrize(("strategy", "gs", "axis"), STRATEGIES)
@pytest.mark.parametrize("observer", ["minmax", "static_minmax", "moving_average_minmax"])
@pytest.mark.parametrize(("kind", "bits", "sym"), FORMATS)
def test_minmax_observers_equal_torch_reference(
    strategy, gs, axis, observer, kind, bits, sym
) -> None:
    rows, cols = 24, 10
    batches = [data(40 + b, rows, cols) for b in range(4)]
    obs = fo.Observer(
        cols,
        observer,
        strategy=strategy,
        group_size=gs,
        channel_axis=axis,
        type=kind,
        num_bits=bits,
        symmetric=sym,
        averaging_constant=0.3,
    )
    for b in batches:
        obs.update(b)
    groups = layout(strategy, gs, axis, rows, cols)
    lo, hi = ref_minmax(batches, groups, observer, 0.3)
    glo, ghi = obs.min_max()
    assert torch.equal(glo.reshape(-1), lo) and torch.equal(ghi.reshape(-1), hi)
    s, z = obs.scale_zero_point()
    rs, rz = ct_qparams(lo, hi, kind, bits, sym)
    assert same_bits(s.reshape(-1), rs)
    assert torch.equal(z.reshape(-1), rz)
    assert obs.batches == 4


@pytest.mark.parametrize(
    ("strategy", "gs", "axis"), [STRATEGIES[0], STRATEGIES[1], STRATEGIES[2], STRATEGIES[4]]
)
@pytest.mark.parametrize(
    ("kind", "bits", "sym"), [("int", 4, True), ("int", 4, False), ("float", 8, True)]
)
def test_mse_observer_equals_brute_force(strategy, gs, axis, kind, bits, sym) -> None:
    rows, cols = 12, 8
    batches = [data(60 + b, rows, cols) for b in range(3)]
    obs = fo.Observer(
        cols, "mse", strategy=strategy, group_size=gs, type=kind, num_bits=bits, symmetric=sym
    )
    for b in batches:
        obs.update(b)
    groups = layout(strategy, gs, axis, rows, cols)
    _, _, err, best = ref_mse(batches, groups, kind, bits, sym)
    mn, mx = ref_minmax(batches, groups, "minmax")
    glo, ghi = (t.reshape(-1) for t in obs.min_max())
    # The shrink factor chosen per parameter, recovered from the returned range (float32 p as
    # torch multiplies a float32 tensor by a Python float).
    p = torch.tensor([1 - k / 100 for k in range(err.shape[1])], dtype=torch.float32)
    for j in range(len(mn)):
        hits = ((p * mn[j] == glo[j]) & (p * mx[j] == ghi[j])).nonzero()
        assert len(hits), f"param {j}: the range is no candidate"
        k = int(hits[0])
        # Optimal under the reference's own error sums (float32 vs float64 summation aside).
        assert err[j, k] <= err[j].min() * (1 + 1e-6), (j, k, int(best[j]))
    if kind == "int":
        assert (best > 0).any(), "the search never shrank: the test data is too tame"
    s, z = obs.scale_zero_point()
    rs, rz = ct_qparams(glo.reshape(-1), ghi.reshape(-1), kind, bits, sym)
    assert same_bits(s.reshape(-1), rs) and torch.equal(z.reshape(-1), rz)


def test_observer_reads_bf16_and_f16_exactly() -> None:
    x = data(7, 33, 20)
    for dt in (torch.bfloat16, torch.float16):
        a, b = fo.Observer(20, strategy="channel"), fo.Observer(20, strategy="channel")
        a.update(x.to(dt))
        b.update(x.to(dt).float())
        assert torch.equal(a.min_max()[0], b.min_max()[0]) and torch.equal(
            a.min_max()[1], b.min_max()[1]
        )
    # Leading dimensions flatten into rows.
    o = fo.Observer(20, strategy="token")
    o.update(x[:32].reshape(4, 8, 20))
    assert o.scale_zero_point()[0].shape == (32, 1)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_are_clear_value_errors() -> None:
    with pytest.raises(ValueError, match="group_size"):
        fo.Observer(8, strategy="group")
    with pytest.raises(ValueError, match="num_bits=8"):
        fo.Observer(8, type="float", num_bits=4)
    with pytest.raises(ValueError, match="symmetric"):
        fo.Observer(8, type="float", symmetric=False)
    with pytest.raises(ValueError, match="observer must be"):
        fo.Observer(8, "histogram")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="averaging_constant"):
        fo.Observer(8, "moving_average_minmax", averaging_constant=0.0)
    with pytest.raises(ValueError, match="channel_axis"):
        fo.Observer(8, strategy="channel", channel_axis=2)
    o = fo.Observer(8, strategy="token")
    with pytest.raises(ValueError, match="no batch"):
        o.scale_zero_point()
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        o.update(torch.zeros(3, 7))
    bad = torch.ones(3, 8)
    bad[2, 5] = math.inf
    with pytest.raises(ValueError, match="row 2, column 5"):
        o.update(bad)
    assert o.batches == 0
    o.update(torch.ones(3, 8))
    with pytest.raises(ValueError, match="same rows"):
        o.update(torch.ones(4, 8))
    x = torch.ones(4, 8)
    with pytest.raises(ValueError, match="expected 4 values"):
        fo.fake_quantize_int(x, torch.ones(3), strategy="token")
    with pytest.raises(ValueError, match=r"scales\[1\]"):
        fo.fake_quantize_fp8(x, torch.tensor([1.0, 0.0, 1.0, 1.0]), strategy="token")
    with pytest.raises(ValueError, match="zero_points"):
        fo.fake_quantize_int(x, torch.ones(1), torch.tensor([200]))
    with pytest.raises(ValueError, match="column 3"):
        fo.dynamic_token_fake_quantize(torch.tensor([[1.0, 2.0, 3.0, math.nan]]))
    with pytest.raises(ValueError, match="floating-point"):
        fo.dynamic_token_fake_quantize(torch.ones(2, 2, dtype=torch.int32))


def test_core_checks_arrays() -> None:
    x = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="scales: expected dtype float32"):
        _core.fake_quantize_fp8(x, np.ones(1, dtype=np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.fake_quantize_fp8(np.ones((8, 4), dtype=np.float32).T, np.ones(1, dtype=np.float32))
    with pytest.raises(ValueError, match="zero_points: expected dtype int32"):
        _core.fake_quantize_int(x, np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.int64))
    with pytest.raises(TypeError, match="scales"):
        _core.fake_quantize_fp8(x, [1.0])
    with pytest.raises(ValueError, match="dtype='bf16'"):
        _core.Observer(8).update(np.ones((2, 8), dtype=np.int16))
