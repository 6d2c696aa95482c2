"""Hessian accumulation through the Python API against float64 ``(2/n) X^T X``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ferroquant import _core, solver
from reference_gptq import correlated_activations

N = 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def x_of(tokens: int, seed: int = 0) -> torch.Tensor:
    return correlated_activations(tokens, N, seed=seed)


def h64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (2.0 / x.shape[0]) * (x.T @ x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_float64(dtype: torch.dtype) -> None:
    x = x_of(1000).to(dtype)
    acc = solver.HessianAccumulator(N)
    acc.add_batch(x)
    h = acc.hessian()
    assert h.dtype == torch.float32 and h.shape == (N, N)
    assert acc.samples == 1000
    # Reference from the same (rounded) inputs: the only error left is fp32 accumulation.
    assert rel_err(h, h64(x.float())) < 2e-5
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_in_pieces_equal_one_batch(dtype: torch.dtype) -> None:
    x = x_of(900, seed=1).to(dtype)
    whole = solver.HessianAccumulator(N)
    whole.add_batch(x)
    pieces = solver.HessianAccumulator(N)
    for chunk in (x[:1], x[1:300], x[300:301], x[301:]):
        pieces.add_batch(chunk)
    assert pieces.samples == whole.samples == 900
    assert rel_err(pieces.hessian(), whole.hessian()) < 1e-5
    assert rel_err(pieces.hessian(), h64(x.float())) < 2e-5


def test_leading_dims_are_flattened_and_merge() -> None:
    x = x_of(600, seed=2)
    acc = solver.HessianAccumulator(N)
    acc.add_batch(x.reshape(4, 150, N))
    assert acc.samples == 600
    assert rel_err(acc.hessian(), h64(x)) < 2e-5
    a, b = solver.HessianAccumulator(N), solver.HessianAccumulator(N)
    a.add_batch(x[:100])
    b.add_batch(x[100:])
    a.merge(b)
    assert a.samples == 600
    assert rel_err(a.hessian(), h64(x)) < 2e-5


def test_float64_input_is_converted() -> None:
    x = x_of(200, seed=3).double()
    acc = solver.HessianAccumulator(N)
    acc.add_batch(x)
    assert rel_err(acc.hessian(), h64(x.float())) < 2e-5


def test_numpy_level_dtypes() -> None:
    x = x_of(300, seed=4)
    ref = h64(x.to(torch.bfloat16).float())
    for bits in (
        x.to(torch.bfloat16).view(torch.int16).numpy(),
        x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
    ):
        acc = _core.HessianAccumulator(N)
        acc.add_batch(bits, dtype="bf16")
        assert rel_err(torch.from_numpy(acc.hessian()), ref) < 2e-5
    f16 = x.to(torch.float16)
    acc = _core.HessianAccumulator(N)
    acc.add_batch(f16.view(torch.int16).numpy(), dtype="f16")
    acc.add_batch(f16.numpy())
    assert acc.samples == 600
    assert rel_err(torch.from_numpy(acc.hessian()), h64(f16.float())) < 2e-5
    assert repr(acc) == f"HessianAccumulator(columns={N}, samples=600)"


def test_accumulator_errors() -> None:
    acc = _core.HessianAccumulator(N)
    with pytest.raises(
        ValueError, match=r"x: a int16 array holds raw 16-bit patterns; say which with dtype='bf16'"
    ):
        acc.add_batch(np.zeros((2, N), np.int16))
    with pytest.raises(ValueError, match=r"x: expected float32 or float16.*got dtype float64"):
        acc.add_batch(np.zeros((2, N)))
    with pytest.raises(ValueError, match=r"x: dtype='bf16' needs a uint16 or int16 array"):
        acc.add_batch(np.zeros((2, N), np.float32), dtype="bf16")
    with pytest.raises(ValueError, match=r"x: unknown dtype 'int8'"):
        acc.add_batch(np.zeros((2, N), np.float32), dtype="int8")
    with pytest.raises(
        ValueError,
        match=rf"x: expected shape \[rows, {N}\] \(the accumulator's in_features\), got \[2, 5\]",
    ):
        acc.add_batch(np.zeros((2, 5), np.float32))
    with pytest.raises(
        ValueError, match=r"x: expected a 2-D array \[rows, in_features\], got shape \[2, 3, 96\]"
    ):
        acc.add_batch(np.zeros((2, 3, N), np.float32))
    with pytest.raises(ValueError, match=r"x: array must be C-contiguous"):
        acc.add_batch(np.zeros((N, 2), np.float32).T)  # Fortran-ordered view, shape [2, N]
    with pytest.raises(TypeError, match=r"x: expected a numpy.ndarray"):
        acc.add_batch([[0.0] * N])
    with pytest.raises(ValueError, match=r"columns must be a positive integer \(got 0\)"):
        _core.HessianAccumulator(0)
    with pytest.raises(
        ValueError, match=r"other: accumulators have different in_features \(96 here, 3 in other\)"
    ):
        acc.merge(_core.HessianAccumulator(3))
    with pytest.raises(ValueError, match=r"cannot merge an accumulator into itself"):
        acc.merge(acc)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 96\], got \[4, 5\]"):
        solver.HessianAccumulator(N).add_batch(torch.zeros(4, 5))
    assert acc.samples == 0
