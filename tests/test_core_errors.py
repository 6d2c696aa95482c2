"""Bad input gets a clear exception of the right type (asserting on the message), damping
escalation is reported, and a Rust panic surfaces as RuntimeError instead of a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ferroquant import _core, solver
from ferroquant._core import HessianNotPositiveDefiniteError

NAME = "model.layers.0.mlp.down_proj"


def good_layer(n: int = 16, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return torch.randn(rows, n, generator=g), ((2.0 / x.shape[0]) * x.T @ x).float()


def indefinite(n: int, lam_min_frac: float) -> torch.Tensor:
    """Symmetric H whose smallest eigenvalue is ``lam_min_frac * mean(diag H)`` (negative)."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    lam[0] = 0.0
    lam[0] = lam_min_frac * lam.sum() / (n - lam_min_frac)  # so that lam[0] = frac * mean(lam)
    return ((q * lam) @ q.T).float()


def test_nan_weight() -> None:
    w, h = good_layer()
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match=rf"^layer '{NAME}': .*(NaN|non-finite)") as e:
        solver.gptq_quantize(w, h, group_size=-1, name=NAME)
    assert "weight" in str(e.value).lower()


def test_nan_or_inf_activations() -> None:
    acc = solver.HessianAccumulator(4)
    x = torch.ones(3, 4)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"(?i)(inf|non-finite)"):
        acc.add_batch(x)
    assert acc.samples == 0


def test_nan_hessian() -> None:
    w, h = good_layer()
    h[2, 3] = h[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"(?i)hessian.*NaN.* at row 2, column 3"):
        solver.gptq_quantize(w, h, group_size=-1)
    with pytest.raises(
        ValueError,
        match=r"Hessian \(16x16\) contains a non-finite value \(NaN\) at row 2, column 3",
    ):
        _core.factor_damped(h.numpy())


def test_wrong_shapes_and_dtypes() -> None:
    w, h = good_layer()
    with pytest.raises(
        ValueError,
        match=rf"^layer '{NAME}': hessian: expected shape \[16, 16\] to match the weight's 16 input columns, got \[8, 8\]$",
    ):
        solver.gptq_quantize(w, h[:8, :8].contiguous(), name=NAME)
    with pytest.raises(ValueError, match=r"hessian: expected a square matrix, got shape \[16, 8\]"):
        _core.gptq_quantize(w.numpy(), h[:, :8].contiguous().numpy())
    with pytest.raises(ValueError, match=r"weight: expected dtype float32, got float64"):
        _core.gptq_quantize(w.double().numpy(), h.numpy())
    with pytest.raises(
        ValueError, match=r"weight: expected a 2-D float32 array, got 1 dimensions \(shape \[16\]\)"
    ):
        _core.gptq_quantize(w[0].numpy(), h.numpy())
    with pytest.raises(ValueError, match=r"weight: array must be C-contiguous"):
        _core.gptq_quantize(np.asfortranarray(w.numpy()), h.numpy())
    with pytest.raises(
        TypeError, match=r"hessian: expected a numpy.ndarray \(2-D float32\), got list"
    ):
        _core.gptq_quantize(w.numpy(), h.tolist())
    with pytest.raises(
        ValueError, match=r"weight: expected a floating-point tensor, got torch.int32"
    ):
        solver.gptq_quantize(w.to(torch.int32), h)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 5}, r"bits must be one of 2, 3, 4, 8 \(got 5\)"),
        ({"bits": 1}, r"bits must be one of 2, 3, 4, 8 \(got 1\)"),
        (
            {"group_size": 0},
            r"group_size must be -1 \(one group per row\) or a positive integer \(got 0\)",
        ),
        ({"block_size": 0}, r"block_size must be a positive integer \(got 0\)"),
        ({"observer": "max"}, r"observer must be 'minmax', 'mse' or 'hessian_mse' \(got 'max'\)"),
        ({"damp_percent": 0.0}, r"damp_percent must be a positive finite number \(got 0"),
        ({"damp_growth": 1.0}, r"damp_growth must be a finite number > 1 \(got 1"),
        ({"damp_max": 0.001}, r"damp_max must be finite and >= damp_percent"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    w, h = good_layer()
    with pytest.raises(ValueError, match=message):
        solver.gptq_quantize(w, h, **kwargs)


def test_empty_input() -> None:
    _, h = good_layer()
    with pytest.raises(ValueError, match=r"weight: array is empty \(shape \[0, 16\]\)"):
        solver.gptq_quantize(torch.zeros(0, 16), h)
    with pytest.raises(ValueError, match=r"weight: array is empty \(shape \[4, 0\]\)"):
        solver.rtn_quantize(torch.zeros(4, 0))
    with pytest.raises(ValueError, match=r"hessian: array is empty"):
        _core.factor_damped(np.zeros((0, 0), np.float32))


def test_all_dead_hessian() -> None:
    w, _ = good_layer()
    with pytest.raises(
        ValueError,
        match=rf"^layer '{NAME}': no calibration signal: every input column of the Hessian is zero",
    ):
        solver.gptq_quantize(w, torch.zeros(16, 16), name=NAME)
    # An accumulator that never saw a token gives the same clear error, not a crash.
    acc = solver.HessianAccumulator(16)
    with pytest.raises(ValueError, match=r"no calibration signal"):
        solver.gptq_quantize(w, acc.hessian())


def test_indefinite_hessian_lists_damping_tried() -> None:
    w, _ = good_layer()
    h = indefinite(16, -3.0)  # no damping up to 100% of mean(diag) makes it PD
    with pytest.raises(HessianNotPositiveDefiniteError) as e:
        solver.gptq_quantize(w, h, name=NAME)
    msg = str(e.value)
    assert msg.startswith(
        f"layer '{NAME}': Hessian (16x16) is not positive definite even after damping"
    )
    assert "[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1]" in msg
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(
        HessianNotPositiveDefiniteError, match=r"tried dampening fractions \[0\.1, 0\.3\]"
    ):
        _core.factor_damped(h.numpy(), damp_percent=0.1, damp_growth=3.0, damp_max=0.3)


def test_singular_hessian_needs_more_damping_and_reports_it() -> None:
    w, _ = good_layer()
    h = indefinite(16, -0.03)  # fails at 1% and 2% of mean(diag), succeeds at 4%
    r = solver.gptq_quantize(w, h, group_size=-1)
    assert r.damp_attempts == pytest.approx([0.01, 0.02, 0.04])
    assert r.damp_frac == pytest.approx(0.04) and r.damp_frac > 0.01
    assert torch.isfinite(r.dequantized).all()
    f = _core.factor_damped(h.numpy())
    assert f["attempts"] == [0.01, 0.02, 0.04]  # shortest decimal form of the f32 values


def test_panic_becomes_runtime_error() -> None:
    with pytest.raises(
        RuntimeError, match=r"^ferroquant internal error in _test_panic: kaboom 42$"
    ):
        _core._test_panic("kaboom 42")
    # The interpreter and the extension are still usable afterwards.
    w, h = good_layer()
    assert solver.gptq_quantize(w, h, group_size=-1).codes.shape == (8, 16)


def test_threads() -> None:
    assert solver.available_threads() >= 1
    with pytest.raises(ValueError, match=r"n must be a positive integer \(got 0\)"):
        solver.set_num_threads(0)
