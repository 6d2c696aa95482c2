"""Type stubs for ``ferroquant._core``, the Rust extension (PyO3 bindings to ferroquant-core).

Conventions shared by every function:

* Arrays are numpy arrays read without copying; they must be C-contiguous (row-major), aligned,
  native little-endian, and of exactly the dtype named (no silent conversion). A wrong dtype,
  shape or layout raises ``ValueError`` naming the argument and what was expected; a non-array
  raises ``TypeError``.
* Errors from the core: bad arguments and NaN/Inf -> ``ValueError``; a Hessian that stays
  non positive-definite after all damping -> ``HessianNotPositiveDefiniteError``; file-system
  failures -> ``OSError``. A Rust panic becomes ``RuntimeError("ferroquant internal error in
  <fn>: ...")``, never a crash.
* The GIL is released while the core computes, so other Python threads keep running.
* ``bits`` is one of 2, 3, 4, 8.
"""

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypedDict

import numpy as np
import numpy.typing as npt

class HessianNotPositiveDefiniteError(RuntimeError):
    """The damped Hessian stayed non positive-definite after every damping step.

    The message lists every damping fraction tried. More calibration data, a larger
    ``damp_max`` or a larger ``damp_percent`` are the usual remedies."""

class HessianAccumulator:
    """Streaming ``H = (2/n) * sum_t x_t x_t^T`` for one linear layer, accumulated in float32.

    The running sum is rescaled as samples arrive (like the GPTQ reference), so ``hessian()``
    is valid after any number of batches. Not for concurrent use from several threads
    (a second concurrent call raises ``RuntimeError: Already borrowed``)."""

    def __init__(self, columns: int) -> None:
        """``columns`` = the layer's in_features (> 0)."""
    def add_batch(
        self,
        x: npt.NDArray[Any],
        dtype: Literal["bf16", "bfloat16", "f16", "fp16", "float16", "f32", "fp32", "float32"]
        | None = None,
    ) -> None:
        """Adds the tokens of ``x``, shape ``[rows, columns]``.

        ``x`` is float32 or float16 (``dtype`` None or matching), or a uint16/int16 array of
        raw bfloat16 / float16 bit patterns with ``dtype="bf16"`` / ``"f16"`` (a torch bf16
        tensor passes as ``t.view(torch.int16).numpy()``). NaN/Inf -> ``ValueError``."""
    def hessian(self) -> npt.NDArray[np.float32]:
        """The full symmetric ``[columns, columns]`` Hessian (a new array)."""
    def merge(self, other: HessianAccumulator) -> None:
        """Adds ``other``'s samples as if its batches had been added here (same ``columns``)."""
    @property
    def samples(self) -> int:
        """Number of token rows accumulated so far."""
    @property
    def columns(self) -> int:
        """in_features."""

class Factorization(TypedDict):
    damp_frac: float  # damping fraction of mean(diag H) finally used
    damp_value: float  # absolute value added to the diagonal
    attempts: list[float]  # every fraction tried, in order; the last one succeeded
    dead: list[int]  # inputs with zero diagonal (their H_ii was set to 1)

class FactorResult(Factorization):
    factor: npt.NDArray[np.float32]  # upper U' with H_damped = U' U'^T

class InverseResult(Factorization):
    upper: npt.NDArray[np.float32]  # upper U with H_damped^-1 = U^T U

def factor_damped(
    hessian: npt.NDArray[np.float32],
    *,
    damp_percent: float = 0.01,
    damp_growth: float = 2.0,
    damp_max: float = 1.0,
) -> FactorResult:
    """Dead-column handling, damping ``damp_percent * mean(diag H)``, and the upper-lower
    Cholesky factor of the damped Hessian (float32 ``[n, n]``). On failure the damping grows by
    ``damp_growth`` up to ``damp_max``; then ``HessianNotPositiveDefiniteError``."""

def damped_inverse_upper(
    hessian: npt.NDArray[np.float32],
    *,
    damp_percent: float = 0.01,
    damp_growth: float = 2.0,
    damp_max: float = 1.0,
) -> InverseResult:
    """The upper Cholesky factor of ``(H + damp I)^-1`` as the GPTQ reference computes it, with
    the same damping escalation as ``factor_damped``."""

class QuantResult(TypedDict):
    codes: npt.NDArray[np.uint8]  # [rows, cols], in [0, 2^bits - 1], original column order
    scales: npt.NDArray[np.float32]  # [rows, n_groups]
    zeros: npt.NDArray[np.int32]  # [rows, n_groups], integers in [0, 2^bits - 1]
    g_idx: npt.NDArray[np.int32]  # [cols], group of each original column
    dequantized: npt.NDArray[np.float32]  # scale * (code - zero), [rows, cols]
    loss: float  # tr((W-Q) H (W-Q)^T) with the undamped H; NaN for RTN without a Hessian
    perm: npt.NDArray[np.int64] | None  # processing order with act_order (perm[p] = column)
    n_groups: int
    damp_frac: float
    damp_attempts: list[float]
    dead: list[int]

def gptq_quantize(
    weight: npt.NDArray[np.float32],
    hessian: npt.NDArray[np.float32],
    *,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = -1,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp_percent: float = 0.01,
    damp_growth: float = 2.0,
    damp_max: float = 1.0,
    observer: Literal["minmax", "mse"] = "minmax",
    mse_grid: int = 100,
    mse_maxshrink: float = 0.8,
    mse_norm: float = 2.4,
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
) -> QuantResult:
    """GPTQ of one layer: ``weight`` float32 ``[rows, cols]``, ``hessian`` float32 ``[cols, cols]``.

    ``group_size`` -1 = one grid per row, else any positive size (the last group may be
    shorter). ``act_order`` processes columns by descending ``diag(H)``; with
    ``static_groups`` the grids are fixed up front per contiguous group so ``g_idx`` stays
    ``col // group_size``. ``block_size`` is the lazy-batch width. Damping starts at
    ``damp_percent`` of ``mean(diag H)`` and grows by ``damp_growth`` up to ``damp_max``.
    ``observer="mse"`` searches ``mse_grid`` shrink steps down to ``1 - mse_maxshrink`` of the
    range, minimising ``sum |q(x) - x|^mse_norm``. Every scale is rounded to ``scale_dtype``
    (its storage dtype) before codes are chosen with it; a scale beyond float16's range raises
    ``ValueError``."""

def rtn_quantize(
    weight: npt.NDArray[np.float32],
    *,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = -1,
    observer: Literal["minmax", "mse"] = "minmax",
    mse_grid: int = 100,
    mse_maxshrink: float = 0.8,
    mse_norm: float = 2.4,
    hessian: npt.NDArray[np.float32] | None = None,
    scale_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
) -> QuantResult:
    """Round-to-nearest with the same grids and result layout as ``gptq_quantize``; ``loss``
    is computed when ``hessian`` is given, else NaN."""

def pack_gptq_qweight(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.int32]:
    """GPTQ ``qweight``: codes ``[out, in]`` -> int32 ``[words, out]`` packed along the input
    dimension, lowest input index in the lowest bits; 3-bit packs 32 values in 3 words."""

def unpack_gptq_qweight(
    qweight: npt.NDArray[np.int32], bits: int, in_features: int
) -> npt.NDArray[np.uint8]:
    """Inverse of ``pack_gptq_qweight``: ``[words, out]`` -> codes ``[out, in_features]``."""

def pack_gptq_qzeros(
    zeros: npt.NDArray[np.int32], bits: int, v1: bool = True
) -> npt.NDArray[np.int32]:
    """GPTQ ``qzeros``: zeros ``[n_groups, out]`` -> int32 ``[n_groups, words]`` packed along the
    output dimension; ``v1`` stores ``zero - 1`` (a zero of 0 is an error), v2 the raw zero."""

def unpack_gptq_qzeros(
    qzeros: npt.NDArray[np.int32], bits: int, out_features: int, v1: bool = True
) -> npt.NDArray[np.int32]:
    """Inverse of ``pack_gptq_qzeros``: -> zeros ``[n_groups, out_features]``."""

def pack_ct_weight(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.int32]:
    """compressed-tensors ``weight_packed``: codes ``[out, in]`` (signed value + 2^(bits-1)) ->
    int32 ``[out, ceil(in*bits/32)]`` packed along the input within each row (dense for 3 bits)."""

def unpack_ct_weight(
    packed: npt.NDArray[np.int32], bits: int, in_features: int
) -> npt.NDArray[np.uint8]:
    """Inverse of ``pack_ct_weight``: -> codes ``[out, in_features]``."""

def pack_ct_zero_point(zeros: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.int32]:
    """compressed-tensors ``weight_zero_point``: zeros ``[out, n_groups]`` packed along dim 0 ->
    int32 ``[ceil(out*bits/32), n_groups]``."""

def unpack_ct_zero_point(
    packed: npt.NDArray[np.int32], bits: int, out_features: int
) -> npt.NDArray[np.uint8]:
    """Inverse of ``pack_ct_zero_point``: -> zeros ``[out_features, n_groups]``."""

def write_safetensors(
    directory: str | PathLike[str],
    tensors: Sequence[
        tuple[str, npt.NDArray[Any], Literal["I32", "I64", "I8", "U8", "F16", "BF16", "F32"]]
    ],
    *,
    stem: str = "model",
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Writes ``(name, array, dtype)`` tensors to ``{directory}/{stem}.safetensors``, or to
    ``{stem}-0000i-of-0000N.safetensors`` shards plus ``{stem}.safetensors.index.json`` when the
    total exceeds ``max_shard_bytes``. The array's raw bytes are written as ``dtype`` (element
    sizes must match, so a bf16 tensor passes as an int16 view with ``"BF16"``). Files are
    written under temporary names and renamed; a failure leaves no partial file. Returns the
    written paths. Duplicate names, size mismatches -> ``ValueError``; I/O -> ``OSError``."""

def set_num_threads(n: int) -> None:
    """Runs every later call in a dedicated pool of ``n`` threads (default: rayon's global pool,
    sized by ``RAYON_NUM_THREADS`` or the number of cores)."""

def available_threads() -> int:
    """Number of threads the core computes with."""

def _test_panic(message: str) -> None:
    """Test hook: panics in Rust (GIL released, inside the pool); must raise RuntimeError."""

# --- CUDA (device pointers are raw addresses of torch CUDA tensors; see ferroquant.cuda) ------

def cuda_available() -> bool:
    """True when the NVIDIA driver, cuBLAS, cuSOLVER and NVRTC load and a context opens."""

def cuda_unavailable_reason() -> str | None:
    """Why ``cuda_available()`` is False (None when it is True)."""

def cuda_device_name(device: int) -> str: ...
def cuda_hessian_add(
    h: Any, x: Any, slot: Any, samples: int, batch: int, stream: int, device: int, *,
    dtype: Literal["float32", "float16", "bfloat16"] | None = None,
) -> int:
    """Adds the rows of ``x`` ``[..., n]`` to the fp32 ``[n, n]`` Hessian ``h`` (running
    rescale by the sample counts), on ``stream`` of ``device``; returns the rows added. A NaN/Inf
    is recorded in ``slot`` (uint8 ``[24]``, all 0xff at first), not raised: see
    ``cuda_hessian_check``."""

def cuda_hessian_check(slot: Any, in_features: int, stream: int, device: int) -> None:
    """``ValueError`` (the CPU accumulator's message) for the first batch ``slot`` recorded a
    NaN/Inf for; one host synchronisation, when the Hessian is read out."""

def cuda_gptq_workspace_bytes(rows: int, cols: int, device: int) -> int: ...
def cuda_gptq_solve(
    weight: int, hessian: int, codes: int, scales: int, zeros: int, dequantized: int,
    workspace: int, workspace_bytes: int, rows: int, cols: int, stream: int, device: int, *,
    bits: int = 4, symmetric: bool = True, group_size: int = -1, act_order: bool = False,
    static_groups: bool = False, block_size: int = 128, damp_percent: float = 0.01,
    damp_growth: float = 2.0, damp_max: float = 1.0, observer: str = "minmax",
    scale_dtype: str = "float32",
) -> dict[str, Any]:
    """GPTQ on the GPU into caller-allocated outputs; returns loss, damping and dead columns."""

def cuda_check_options(
    *, bits: int = 4, symmetric: bool = True, group_size: int = -1, block_size: int = 128,
    damp_percent: float = 0.01, damp_growth: float = 2.0, damp_max: float = 1.0,
    observer: str = "minmax", scale_dtype: str = "float32",
) -> None:
    """Raises ``ValueError`` for options the GPU solver does not take (same text as the CPU's)."""

# Activation observers and fake quantization. ``x`` is read as ``HessianAccumulator.add_batch``
# reads it: a 2-D float32 or float16 array, or uint16/int16 bit patterns with ``dtype='bf16'``
# or ``'f16'``. Scales are float32 and zero points int32 arrays of any shape holding the
# strategy's number of values, row-major: tensor 1, token ``rows``, channel ``columns`` (per
# row with ``channel_axis=0``), group ``rows * ceil(columns / group_size)``. Codes are signed
# (compressed-tensors): int symmetric scale = absmax / ((2^b - 1) / 2), asymmetric
# (max - min) / (2^b - 1) with zero = round(clamp(qmin - min / scale)); FP8 absmax / 448.

ObserverName: TypeAlias = Literal["minmax", "static_minmax", "moving_average_minmax", "mse"]
StrategyName: TypeAlias = Literal["tensor", "channel", "token", "group"]

class Observer:
    """Streaming min/max statistics (or the MSE shrink search) of one tensor kind.

    ``minmax`` / ``static_minmax``: absolute min/max over all batches; ``moving_average_minmax``:
    ``m <- m + c * (batch_min - m)``, the first batch sets ``m``; ``mse``: per scale, the shrink
    ``p = 1 - i / grid`` (``i < floor(maxshrink * grid)``) of the running range with the
    smallest ``sum |x - qdq(x)|^norm`` summed over batches. NaN/inf in a batch is a
    ``ValueError`` naming its position (the observer is left unchanged)."""

    def __init__(
        self, columns: int, observer: ObserverName = "minmax", *,
        strategy: StrategyName = "tensor", type: Literal["int", "float"] = "int",
        num_bits: int = 8, symmetric: bool = True, group_size: int | None = None,
        channel_axis: int = 1, averaging_constant: float = 0.01, grid: int = 100,
        maxshrink: float = 0.2, norm: float = 2.4,
    ) -> None: ...
    def update(self, x: npt.NDArray[Any], dtype: Literal["bf16", "f16", "f32"] | None = None) -> None:
        """Folds a ``[rows, columns]`` batch in (per-row strategies: same rows every batch)."""
    def scale_zero_point(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
        """2-D scales and zero points; ``ValueError`` before the first batch."""
    def min_max(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The range the scales come from (MSE: the chosen shrunk range)."""
    @property
    def batches(self) -> int: ...
    @property
    def columns(self) -> int: ...

def fake_quantize_int(
    x: npt.NDArray[Any], scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.int32] | None = None, *, num_bits: int = 8,
    strategy: StrategyName = "tensor", group_size: int | None = None, channel_axis: int = 1,
    dtype: Literal["bf16", "f16", "f32"] | None = None,
) -> npt.NDArray[np.float32]:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` (half to even; NaN stays NaN)."""

def fake_quantize_fp8(
    x: npt.NDArray[Any], scales: npt.NDArray[np.float32], *, strategy: StrategyName = "tensor",
    group_size: int | None = None, channel_axis: int = 1,
    dtype: Literal["bf16", "f16", "f32"] | None = None,
) -> npt.NDArray[np.float32]:
    """``e4m3fn(clamp(x / s, -448, 448)) * s`` (round to nearest even; NaN stays NaN)."""

def dynamic_token_fake_quantize(
    x: npt.NDArray[Any], *, type: Literal["int", "float"] = "int", num_bits: int = 8,
    symmetric: bool = True, dtype: Literal["bf16", "f16", "f32"] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Per-row scales from each row's min/max and the qdq in one pass:
    ``(qdq(x), scales [rows, 1], zero points [rows, 1])``; NaN/inf is a ``ValueError``."""
